# Mask R-CNN on COCO 2017 (1x, box + mask AP) with the kiv student as backbone:
# the ViT-Adapter pyramid of kiv.AdapterViT (4 maps at strides 4/8/16/32,
# 768 channels each) -> mmdet's FPN -> mmdet's standard Mask R-CNN heads.
# 8 GPUs x 2 images, fp16 AMP, SyncBN, AdamW (ViT-Adapter's 1x recipe).
#   bash tools/dist_train.sh configs/mmdet/<this file> 8
# The student is exported from the distillation recipe
# configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_8xb64-100k_in1k.py
# with tools/export_student.py to checkpoints/kiv_vit-b14_student.pth.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the kiv student
]
custom_imports = dict(
    imports=['kiv'],
    allow_failed_imports=False)

student_checkpoint = 'checkpoints/kiv_vit-b14_student.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    # mmdet's own resize (1333x800) and padding (to multiples of 32): the
    # backbone pads to its 14-px patches inside and returns maps of the
    # ResNet sizes ceil(H / s), s = 4, 8, 16, 32.
    backbone=dict(
        # Architecture of the exported student
        # (configs/_base_/models/kiv_adapter-vit-b14-reg4.py); its weights
        # come from init_cfg, so the base is not read from its own checkpoint.
        _base_.kiv_student_b14,
        _delete_=True,
        base=dict(_base_.kiv_student_b14.base, checkpoint=None,
                  model_kwargs=dict(drop_path_rate=0.1)),
        drop_path_rate=0.1,
        # Fine-tune the whole student; freeze_base=True keeps the inherited
        # DINOv2 weights fixed (knowledge preservation, less memory).
        freeze_base=False,
        out_type='pyramid',
        out_indices=(0, 1, 2, 3),
        with_cp=True,
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=student_checkpoint)),
    neck=dict(in_channels=[768, 768, 768, 768]))

# The global token (kept so the exported student loads without missing or
# unexpected keys) gets no gradient from detection losses.
find_unused_parameters = True

# AdamW (ViT-Adapter's Mask R-CNN 1x) with layer-wise lr decay over the 12
# base blocks: adapter parts take the depth of the blocks they interact with
# (AdapterViT.get_layer_depth), neck and heads the full lr. No weight decay
# on norms, biases, gammas, tokens and position / level embeddings.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='kiv.BackboneLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(
        layer_decay_rate=0.9,
        norm_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            '.cls_token': dict(decay_mult=0.0),
            '.reg_token': dict(decay_mult=0.0),
            '.pos_embed': dict(decay_mult=0.0),
            'level_embed': dict(decay_mult=0.0),
            'pool.latent': dict(decay_mult=0.0),  # global-token queries
        }))

# 8 GPUs x 2 images; --auto-scale-lr rescales lr for other batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=16)
# a NaN/Inf loss never reaches the weights, under any training script
# (docs/reliability.md); the tiny variants inherit it
custom_hooks = [dict(type='kiv.NonFiniteLossHook')]
