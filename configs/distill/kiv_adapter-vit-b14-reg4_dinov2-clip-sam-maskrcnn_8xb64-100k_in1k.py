# Knowledge inheritance, real scale (8 GPUs x 64 images, bf16 AMP):
#   knowledge base: DINOv2 ViT-B/14 with 4 registers (frozen, = the student base)
#   purpose-specific: CLIP ViT-B/16 (OpenAI), SAM ViT-B, Mask R-CNN R50-FPN
#   data: ImageNet-1k training images, labels ignored.
# Weight files: see README "Teacher weights" (checkpoints/teachers/...).
#   bash tools/dist_train.sh configs/distill/<this file> 8
_base_ = [
    '../_base_/default_runtime.py',
    '../_base_/datasets/imagenet_unlabeled_224.py',
    '../_base_/schedules/adamw_100k.py',
]
ckpt_dir = 'checkpoints/teachers/'
imagenet_norm = dict(mean=[123.675, 116.28, 103.53],
                     std=[58.395, 57.12, 57.375])
clip_norm = dict(mean=[122.771, 116.746, 104.094],
                 std=[68.501, 66.632, 70.323])
dinov2 = dict(
    model_name='vit_base_patch14_reg4_dinov2',
    checkpoint=ckpt_dir + 'dinov2_vitb14_reg4_pretrain.pth')

model = dict(
    type='kiv.KnowledgeInheritance',
    base_teacher='dinov2',
    student=dict(
        type='kiv.AdapterViT',
        base=dict(type='timm', **dinov2),
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        conv_inplane=64,
        deform_num_heads=12,
        n_points=4,
        cffn_ratio=0.25,
        deform_ratio=0.5,
        drop_path_rate=0.1,
        with_global_token=True,
        norm_cfg=dict(type='SyncBN'),
        with_cp=True),
    **{f'student_{k}': v for k, v in imagenet_norm.items()},
    teachers=dict(
        dinov2=dict(
            type='kiv.Teacher',
            source=dict(type='timm', **dinov2,
                        model_kwargs=dict(dynamic_img_size=True,
                                          num_classes=0)),
            input_size=224, pad_to_multiple=14,
            forward_method='forward_features',
            summary=dict(type='cls'),
            dtype='bf16',
            **imagenet_norm),
        clip=dict(
            type='kiv.Teacher',
            source=dict(
                type='timm',
                model_name='vit_base_patch16_clip_224',
                checkpoint=ckpt_dir +
                'vit_base_patch16_clip_224.openai.safetensors',
                model_kwargs=dict(num_classes=0)),
            input_size=224, pad_to_multiple=16,
            forward_method='forward_features',
            summary=dict(type='cls'),
            dtype='bf16',
            **clip_norm),
        sam=dict(
            type='kiv.Teacher',
            source=dict(
                type='timm',
                model_name='samvit_base_patch16',
                checkpoint=ckpt_dir + 'sam_vit_b_01ec64.pth',
                model_kwargs=dict(num_classes=0)),
            input_size=1024, pad_to_multiple=16,
            forward_method='forward_features',
            summary=dict(type='avg'),
            dtype='bf16',
            **imagenet_norm),
        detector=dict(
            type='kiv.Teacher',
            source=dict(
                type='mm',
                config='mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                checkpoint=ckpt_dir +
                'mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth',
                part='backbone+neck'),
            input_size=448,
            summary=dict(type='avg'),
            dtype='bf16',
            **imagenet_norm),
    ),
    latent=dict(
        type='kiv.SharedLatentSpace',
        standardize='phis',
        hidden_dim=1280,
        # PHI-S: estimate the statistics on the first 2000 steps, then freeze
        max_stat_updates=2000,
        teachers=dict(
            dinov2=dict(student_levels=[2]),
            clip=dict(student_levels=[2]),
            sam=dict(student_levels=[0]),
            detector=dict(student_levels=[0, 1, 2, 3, 3]))),
    teacher_weights=dict(dinov2=1.0, clip=1.0, sam=1.0, detector=0.5),
    grad_share_interval=100,
)
find_unused_parameters = False
default_hooks = dict(checkpoint=dict(interval=5000, max_keep_ckpts=3))
