# UperNet on the kiv student on ADE20K: 512x512 crops, 160k iterations,
# 8 GPUs x 2 images, fp16 AMP, SyncBN, AdamW with layer-wise lr decay.
# Backbone: kiv.AdapterViT (DINOv2 ViT-B/14 with 4 registers + ViT-Adapter),
# initialised from the student exported by
#   python tools/export_student.py work_dirs/<distill run>/iter_100000.pth \
#       checkpoints/kiv_vit-b14_student.pth
# after configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_\
# 8xb64-100k_in1k.py. The whole student is fine-tuned (ViT-Adapter recipe).
#   bash tools/dist_train.sh configs/mmseg/<this file> 8
#   bash tools/dist_test.sh configs/mmseg/<this file> <checkpoint> 8
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the kiv student
]
custom_imports = dict(
    imports=['kiv'],
    allow_failed_imports=False)

# The standard ADE20K protocol (image scale 2048x512, 512x512 crops, whole-
# image test, so results compare with published 512x512 numbers). 512 is not
# a multiple of the 14-px patches: kiv.AdapterViT pads inside (zeros after
# normalisation) and returns maps of the ResNet sizes ceil(512 / s).
crop_size = (512, 512)
student = 'checkpoints/kiv_vit-b14_student.pth'
embed_dim = 768
num_classes = 150
norm_cfg = dict(type='SyncBN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        # the student (configs/_base_/models/kiv_adapter-vit-b14-reg4.py);
        # its base's weights come with the exported student
        _base_.kiv_student_b14,
        _delete_=True,
        base=dict(_base_.kiv_student_b14.base, checkpoint=None,
                  model_kwargs=dict(drop_path_rate=0.3)),
        drop_path_rate=0.3,
        # the decode heads read the pyramid only: the summaries' global
        # tokens are left out (the exported ones are skipped with a warning,
        # Pretrained init is non-strict); the pyramid is the student's
        with_global_token=False,
        summary_names=None,
        freeze_base=False,
        frozen_stages=-1,
        out_type='pyramid',
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=student)),
    decode_head=dict(
        in_channels=[embed_dim] * 4, channels=512, num_classes=num_classes,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=embed_dim, in_index=2, num_classes=num_classes,
        norm_cfg=norm_cfg),
    test_cfg=dict(mode='whole'))

train_dataloader = dict(batch_size=2, num_workers=4)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader

# AdamW + layer-wise lr decay over the 12 base blocks (adapter parts take
# the depth of the blocks they interact with, see
# AdapterViT.get_layer_depth); no weight decay on norms, biases, gammas,
# tokens and position / level embeddings.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.05),
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
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
         end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=1500,
         end=160000),
]
default_hooks = dict(
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=16000,
        max_keep_ckpts=2, save_best='mIoU'))
# total batch 16 (8 GPUs x 2): `tools/train.py --auto-scale-lr` rescales
auto_scale_lr = dict(enable=False, base_batch_size=16)
# a NaN/Inf loss never reaches the weights, under any training script
# (docs/reliability.md); the tiny variants inherit it
custom_hooks = [dict(type='kiv.NonFiniteLossHook')]
# The pyramid reaches the heads without the base ViT's final norm (only the
# student's summaries read it), so that norm gets no gradient: DDP must be
# told, or the 2nd iteration of a multi-process run fails. The tiny and the
# kiv.InheritedBackbone variants inherit it.
find_unused_parameters = True
