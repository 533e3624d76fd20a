# The architecture every student row of the demo shares, written once: the
# knowledge base's ViT layout (timm's DINOv2 with registers and LayerScale,
# patch 8 at 64 px, width 128, depth 6) and the ViT-Adapter on it. The
# knowledge base is trained with ``kb_vit``; the inherited student and the
# data-centric rivals are ``dict(adapter, base=dict(kb_vit, ...))``.
kb_vit = dict(
    type='timm',
    model_name='vit_small_patch14_reg4_dinov2',
    model_kwargs=dict(img_size=64, patch_size=8, embed_dim=128, depth=6,
                      num_heads=4, init_values=0.1))
adapter = dict(
    type='kiv.AdapterViT',
    interaction_indexes=[[0, 0], [1, 2], [3, 4], [5, 5]],
    conv_inplane=32,
    deform_num_heads=4,
    n_points=4,
    with_global_token=True)
