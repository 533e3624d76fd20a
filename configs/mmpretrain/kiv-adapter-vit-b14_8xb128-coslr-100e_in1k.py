# Full fine-tuning of the kiv student on ImageNet-1k: base ViT and adapter
# trained with layer-wise lr decay, drop path, Mixup / CutMix, label
# smoothing, RandAugment, random erasing (mmpretrain's MAE ViT-B 100-epoch
# recipe, mae/benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py); linear
# head on the summary vector, 8 GPUs x 128, fp16 AMP. Top-1 / top-5.
# Backbone: kiv.AdapterViT (DINOv2 ViT-B/14 with 4 registers + ViT-Adapter)
# from the student exported by
#   python tools/export_student.py work_dirs/<distill run>/iter_100000.pth \
#       checkpoints/kiv_vit-b14_student.pth
# after configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_\
# 8xb64-100k_in1k.py. 224 = 16 x 14 patches.
#   bash tools/dist_train.sh configs/mmpretrain/<this file> 8
#   bash tools/dist_test.sh configs/mmpretrain/<this file> <checkpoint> 8
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the kiv student
]
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)

student = 'checkpoints/kiv_vit-b14_student.pth'
embed_dim = 768

model = dict(
    type='ImageClassifier',
    backbone=dict(
        # the student (configs/_base_/models/kiv_adapter-vit-b14-reg4.py);
        # its base's weights come with the exported student
        _base_.kiv_student_b14,
        base=dict(_base_.kiv_student_b14.base, checkpoint=None,
                  model_kwargs=dict(drop_path_rate=0.1)),
        drop_path_rate=0.1,
        summary='dinov2',  # or 'clip': CLIP's text-aligned summary
        freeze_base=False,
        frozen_stages=-1,
        out_type='global',
        norm_cfg=dict(type='SyncBN'),
        init_cfg=dict(type='Pretrained', checkpoint=student)),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=embed_dim,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        init_cfg=[dict(type='TruncNormal', layer='Linear', std=2e-5)]),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0)
    ]))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

# AdamW + layer-wise lr decay over the 12 base blocks (adapter parts take
# the depth of the blocks they interact with, see
# AdapterViT.get_layer_depth; mmpretrain's ImageClassifier forwards to it);
# no weight decay on norms, biases, gammas, tokens and embeddings.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=2e-3, weight_decay=0.05, betas=(0.9, 0.999)),
    constructor='LearningRateDecayOptimWrapperConstructor',
    paramwise_cfg=dict(
        layer_decay_rate=0.65,
        norm_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            '.cls_token': dict(decay_mult=0.0),
            '.reg_token': dict(decay_mult=0.0),
            '.pos_embed': dict(decay_mult=0.0),
            'level_embed': dict(decay_mult=0.0),
            '.latent': dict(decay_mult=0.0),
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-4, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=95, by_epoch=True, begin=5,
         end=100, eta_min=1e-6, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2,
                    save_best='auto'))
# With out_type='global' the pyramid output layers (and the c1 projection
# of the spatial prior), and the summaries of the other teachers, get no
# gradient; DDP must be told.
model_wrapper_cfg = dict(
    type='MMDistributedDataParallel', find_unused_parameters=True)
# total batch 1024 (8 GPUs x 128): `tools/train.py --auto-scale-lr` rescales
auto_scale_lr = dict(base_batch_size=1024)
randomness = dict(seed=0, diff_rank_seed=True)
# a NaN/Inf loss never reaches the weights, under any training script
# (docs/reliability.md); the tiny variants inherit it
custom_hooks = [dict(type='kiv.NonFiniteLossHook')]
