# Knowledge inheritance, real scale (8 GPUs x 64 images, bf16 AMP):
#   knowledge base: DINOv2 ViT-B/14 with 4 registers (frozen, = the student base)
#   purpose-specific: CLIP ViT-B/16 (OpenAI), SAM ViT-B, Mask R-CNN R50-FPN
#   data: ImageNet-1k training images (meta/train.txt), labels ignored.
# Weight files: see README "Teacher weights" (checkpoints/teachers/...).
#   bash tools/dist_train.sh configs/distill/<this file> 8
#
# Losses: MSE on PHI-S-standardised targets (RADIOv2.5, the default);
# statistics estimated by a teacher-only warm-up pass, then fixed.
# Every teacher runs at a resolution whose grid matches a student level, so
# no dense target is resized: student 224 px -> patch grid 16x16 (DINOv2,
# read at its own grid), pyramid 56/28/14/7 (strides 4/8/16/32).
#   CLIP ViT-B/16 at 224 -> 14x14 (stride-16 level); summary = CLIP's own
#     image->text projection (512-d, the file's head.*): the student's summary
#     lives in CLIP's text-aligned space, as in RADIO. Dense: the ln_post
#     tokens and MaskCLIP's text-space tokens (both 14x14 on stride 16).
#   SAM ViT-B at 448 -> 28x28 (stride-8 level), dense only. At 1024 SAM costs
#     about 0.75 TFLOP per image (twice the student's whole step); at 448
#     about 0.14 TFLOP. timm does not resample its absolute position
#     embedding (64x64) nor the global blocks' relative position tables
#     (127 rows) for 448; kiv's timm source does, on load (logged).
#   Mask R-CNN FPN at 224 -> P2..P6 56/28/14/7/4 (strides 4..32), dense only.
_base_ = [
    '../_base_/default_runtime.py',
    '../_base_/datasets/imagenet_unlabeled_224.py',
    '../_base_/schedules/adamw_100k.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the student
    '../_base_/models/kiv_detector-space.py',  # detector levels
]
ckpt_dir = 'checkpoints/teachers/'
imagenet_norm = dict(mean=[123.675, 116.28, 103.53],
                     std=[58.395, 57.12, 57.375])
clip_norm = dict(mean=[122.771, 116.746, 104.094],
                 std=[68.501, 66.632, 70.323])
# the knowledge base = the student's base ViT, read from the original
# facebookresearch file; its iBOT mask token is unused
dinov2 = dict(
    _base_.kiv_student_b14.base,
    checkpoint=ckpt_dir + 'dinov2_vitb14_reg4_pretrain.pth',
    drop_keys=[r'^mask_token$'])

train_dataloader = dict(
    dataset=dict(
        data_root='data/imagenet/',
        ann_file='meta/train.txt',  # no recursive scan of 1.28M files
        data_prefix=dict(img_path='train/')))

model = dict(
    type='kiv.KnowledgeInheritance',
    base_teacher='dinov2',
    # the architecture of configs/_base_/models/kiv_adapter-vit-b14-reg4.py
    # (a summary per teacher with one: dinov2, clip) on the knowledge base
    student=dict(
        _base_.kiv_student_b14,
        base=dinov2,
        drop_path_rate=0.1,
        norm_cfg=dict(type='SyncBN'),
        with_cp=True),
    **{f'student_{k}': v for k, v in imagenet_norm.items()},
    teachers=dict(
        dinov2=dict(
            type='kiv.Teacher',
            source=dict(dinov2,
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
                # OpenAI weights need QuickGELU (plain GELU: wrong targets)
                model_name='vit_base_patch16_clip_quickgelu_224',
                checkpoint=ckpt_dir +
                'vit_base_patch16_clip_quickgelu_224.openai.safetensors',
                # keep the file's head (768 -> 512 image->text projection)
                model_kwargs=dict(num_classes=512)),
            input_size=224, pad_to_multiple=16,
            forward_method='forward',
            # ln_post tokens, then MaskCLIP's text-space tokens (last
            # block's value path -> ln_post -> projection), the dense
            # target kiv.TextSegHead reads (open-vocabulary segmentation)
            features=dict(from_output=False, layers=['norm'],
                          text_space=dict(block='blocks', norm='norm',
                                          proj='head')),
            summary=dict(type='layer', name='head'),
            dtype='bf16',
            **clip_norm),
        sam=dict(
            type='kiv.Teacher',
            source=dict(
                type='timm',
                model_name='samvit_base_patch16',
                checkpoint=ckpt_dir + 'sam_vit_b_01ec64.pth',
                # the file is the whole SAM: keep the image encoder only
                drop_keys=[r'^prompt_encoder\.', r'^mask_decoder\.'],
                model_kwargs=dict(img_size=448, num_classes=0)),
            input_size=448, pad_to_multiple=16,
            forward_method='forward_features',
            summary=dict(type='none'),
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
            input_size=224,
            summary=dict(type='none'),
            dtype='bf16',
            **imagenet_norm),
    ),
    latent=dict(
        type='kiv.SharedLatentSpace',
        standardize='phis',
        statistics='fixed',  # estimated by StatisticsWarmupHook, then fixed
        hidden_dim=1280,
        teachers=dict(
            # dinov2 (base_teacher): its own patch grid, preserved heads
            clip=dict(student_levels=[2, 2]),  # ln_post, text space
            sam=dict(student_levels=[1]),
            detector=dict(student_levels=_base_.kiv_detector_space_b14[
                'student_levels']))),
    teacher_weights=dict(dinov2=1.0, clip=1.0, sam=1.0, detector=0.5),
    grad_share_interval=100,
)
find_unused_parameters = False
# statistics: kiv.StatisticsWarmupHook of the base runtime, 50 batches x 64
# images x 8 GPUs = 25.6k images (6.5M DINOv2 patch tokens), then fixed
default_hooks = dict(checkpoint=dict(interval=5000, max_keep_ckpts=3))
