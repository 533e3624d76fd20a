# The kiv student, tiny (CPU tests and examples): the structure of
# kiv_adapter-vit-b14-reg4.py at small sizes, on a DINOv2-like ViT with
# patch 14 and 4 registers (width 64, 4 blocks, 56-px position grid).
#
# Everything that shapes the tiny student's state dict lives here, once:
# the tiny distillation recipe uses it as `model.student`, the tiny
# downstream configs as `model.backbone` (they inherit their real-size
# config and this file; every architecture key is spelt out, so none of the
# ViT-B/14's survives the merge). Task settings stay in each config (see
# kiv_adapter-vit-b14-reg4.py); tests/test_configs.py checks that every
# config building this student has exactly this architecture.
kiv_student_t14 = dict(
    type='kiv.AdapterViT',
    base=dict(
        type='timm',
        model_name='vit_small_patch14_reg4_dinov2',
        model_kwargs=dict(img_size=56, embed_dim=64, depth=4, num_heads=2)),
    interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
    conv_inplane=16,
    deform_num_heads=2,
    n_points=2,
    deform_ratio=1.0,
    with_cffn=True,
    cffn_ratio=0.25,
    use_extra_extractor=True,
    add_vit_feature=True,
    with_global_token=True,
    # a summary per teacher with one
    summary_names=['dinov2', 'clip'])
