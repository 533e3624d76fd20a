# Knowledge inheritance in the demo: the student is the frozen knowledge
# base (``knowledge_base/kb_vit.pth``) plus a zero-initialised ViT-Adapter;
# teachers: the knowledge base itself (base teacher: its heads start as its
# standardiser and it reads the student's own patch grid, so at step 0 its
# loss is 0), the real EfficientNet-Lite0 (its classifier kept as inherited
# head), and the detection and segmentation teachers the demo fine-tuned
# (``teacher_det/``, ``teacher_seg/``: Mask R-CNN and Semantic FPN on an
# ImageNet EfficientNet-Lite0 backbone; dense only, no summary; frozen, so
# BatchNorms folded and channels-last, like EfficientNet-Lite0's base).
# Losses: MSE on PHI-S-standardised targets (the defaults). Multi-task: the
# same classification, Mask R-CNN and Semantic FPN heads the data-centric
# rivals train, on the labelled world views of each batch
# (``task_models``: the demo builds ``model.task_heads`` from them with
# ``kiv_demo.TaskHead``) on the labelled views of each batch (the user's
# small labelled split; ``kiv_demo.LabelledShareSampler`` fixes their number
# per batch). The demo trains from the teacher-feature cache (every teacher,
# the knowledge base included, is read from ``teacher_cache/``) with
# statistics fixed before step 0.
# Same structure as configs/distill/*8xb64*.py, at 64 px on 2 CPU cores.
_base_ = [
    './_base_/adapter-vit-s8-reg4_world_schedule.py',
    './_base_/world_photos_images.py',
    './_base_/effnet_lite0_teacher.py',
    './_base_/kb-vit-s8-reg4_adapter.py',
]
imagenet_norm = dict(mean=[123.675, 116.28, 103.53],
                     std=[58.395, 57.12, 57.375])
# the det / seg teachers' backbone is EfficientNet-Lite0 (its normalisation)
effnet_norm = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
kb_source = dict(_base_.kb_vit, checkpoint='knowledge_base/kb_vit.pth')
model = dict(
    type='kiv.KnowledgeInheritance',
    base_teacher='kb',
    student=dict(
        _base_.adapter,
        base=kb_source,
        # a summary per teacher; the one the student gives downstream (the
        # classification probes, the multi-task classifier, ``forward``) is
        # the classification teacher's: what it knows of the world's classes
        # (the knowledge base's own summary stays in ``summaries['kb']``)
        summary_names=['kb', 'effnet'],
        summary='effnet'),
    **{f'student_{k}': v for k, v in imagenet_norm.items()},
    teachers=dict(
        kb=dict(type='kiv.Teacher',
                source=kb_source,
                input_size=64, pad_to_multiple=8,
                forward_method='forward_features',
                summary=dict(type='cls'),
                **imagenet_norm),
        # the classification teacher: EfficientNet-Lite0's ImageNet
        # weights with a classifier of the world's classes fitted on the
        # teachers' split (``teacher_cls/``); its classifier is kept as the
        # inherited head
        effnet=dict(
            _base_.effnet_teacher,
            source=dict(_base_.effnet_teacher.source,
                        kwargs=dict(num_classes=6),
                        checkpoint='teacher_cls/effnet_world.pth')),
        det=dict(type='kiv.Teacher',
                 source=dict(type='mm',
                             config='teacher_det/teacher_det.py',
                             checkpoint='teacher_det/teacher_det.pth',
                             part='backbone+neck'),
                 input_size=64,
                 features=dict(from_output=True, indices=[0, 1, 2, 3]),
                 summary=dict(type='none'),
                 fuse_conv_bn=True, channels_last=True,
                 **effnet_norm),
        seg=dict(type='kiv.Teacher',
                 source=dict(type='mm',
                             config='teacher_seg/teacher_seg.py',
                             checkpoint='teacher_seg/teacher_seg.pth',
                             part='whole'),
                 input_size=64,
                 summary=dict(type='none'),
                 fuse_conv_bn=True, channels_last=True,
                 **effnet_norm)),
    latent=dict(
        type='kiv.SharedLatentSpace',
        standardize='phis',
        hidden_dim=256,
        teachers=dict(effnet=dict(student_levels=[1, 2, 3]),
                      det=dict(student_levels=[0, 1, 2, 3]),
                      seg=dict(student_levels=[0]))))
# the distillation views with the world's labels following each view (the
# multi-task heads read them; the teachers see the same views)
train_dataloader = dict(dataset=dict(
    pipeline={{_base_.labelled_view_pipeline}}))
# after the last step, the inherited outputs' statistics on 16 batches (256
# views at the demo's batch of 16) of the user's images (no labels): the
# inherited heads' label-free calibration, saved with the heads
custom_hooks = [dict(type='kiv.SafeCheckpointHook'),
                dict(type='kiv.NonFiniteLossHook'),
                dict(type='kiv.StatisticsWarmupHook', num_batches=10**6),
                dict(type='kiv.InheritedCalibrationHook', num_batches=16)]
