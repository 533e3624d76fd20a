# Linear probe of the kiv student on ImageNet-1k: the whole backbone is
# frozen (base ViT and adapter, BN statistics included); a linear classifier
# is trained on the student's summary vector (base CLS token + global
# token), 8 GPUs x 128 images, 100 epochs, cosine schedule. Top-1 / top-5.
# Backbone: kiv.AdapterViT (DINOv2 ViT-B/14 with 4 registers + ViT-Adapter)
# from the student exported by
#   python tools/export_student.py work_dirs/<distill run>/iter_100000.pth \
#       checkpoints/kiv_vit-b14_student.pth
# after configs/distill/kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_\
# 8xb64-100k_in1k.py.
#   bash tools/dist_train.sh configs/mmpretrain/<this file> 8
#   bash tools/dist_test.sh configs/mmpretrain/<this file> <checkpoint> 8
# Data: RandomResizedCrop + flip (no RandAugment / erasing on frozen
# features, as in DINO / DINOv2 linear evaluation); 224 = 16 x 14 patches.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the kiv student
]
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)

student = 'checkpoints/kiv_vit-b14_student.pth'
embed_dim = 768
num_interactions = 4

model = dict(
    type='ImageClassifier',
    backbone=dict(
        # the student (configs/_base_/models/kiv_adapter-vit-b14-reg4.py);
        # its base's weights come with the exported student
        _base_.kiv_student_b14,
        base=dict(_base_.kiv_student_b14.base, checkpoint=None),
        summary='dinov2',  # or 'clip': CLIP's text-aligned summary
        # linear probing: base and every adapter stage frozen (eval mode)
        freeze_base=True,
        frozen_stages=num_interactions + 1,
        out_type='global',
        norm_cfg=dict(type='SyncBN'),
        init_cfg=dict(type='Pretrained', checkpoint=student)),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=embed_dim,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5),
        init_cfg=dict(type='Normal', std=0.01, layer='Linear')))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

# DINO's linear-evaluation recipe: SGD, lr 0.001 x total batch / 256, no
# weight decay, cosine over 100 epochs. Only the head has gradients.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(type='SGD', lr=0.004, momentum=0.9, weight_decay=0.0))
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=100, by_epoch=True, begin=0,
         end=100)
]
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=5)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=2,
                    save_best='auto'))
# total batch 1024 (8 GPUs x 128): `tools/train.py --auto-scale-lr` rescales
auto_scale_lr = dict(base_batch_size=1024)
randomness = dict(seed=0, diff_rank_seed=True)
# a NaN/Inf loss never reaches the weights, under any training script
# (docs/reliability.md); the tiny variants inherit it
custom_hooks = [dict(type='kiv.NonFiniteLossHook')]
