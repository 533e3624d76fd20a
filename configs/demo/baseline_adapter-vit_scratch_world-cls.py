# The data-centric baseline of the demo: the student's architecture
# (knowledge-base ViT + adapter), every weight random and trainable, trained
# supervised on the world's image labels for the same optimizer steps x
# batch size as the inheritance run. Its backbone is then exported and
# probed like the inherited student.
_base_ = ['./_base_/world_cls.py']
model = dict(
    backbone=dict(
        type='kiv.AdapterViT',
        base=dict(
            type='timm',
            model_name='vit_small_patch14_reg4_dinov2',
            checkpoint=None,  # from scratch
            model_kwargs=dict(img_size=64, patch_size=8, embed_dim=128,
                              depth=6, num_heads=4, init_values=0.1)),
        interaction_indexes=[[0, 0], [1, 2], [3, 4], [5, 5]],
        conv_inplane=32,
        deform_num_heads=4,
        n_points=4,
        freeze_base=False,
        out_type='global'),
    head=dict(in_channels=128))
