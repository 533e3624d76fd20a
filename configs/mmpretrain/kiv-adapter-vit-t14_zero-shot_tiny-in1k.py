# Tiny CPU version of kiv-adapter-vit-b14_zero-shot_in1k.py (inherited: the
# same zero-shot head on the inherited CLIP summary, top-1 / top-2), with
# the tiny student (width 64, 4 blocks) on the tiny ImageNet layout of
# kiv.testing.make_tiny_imagenet('data/imagenet') (2 classes). The test
# (tests/test_zero_shot_tools.py) writes the files it names: a tiny student
# with inherited heads and text embeddings of a tiny random CLIP written in
# open_clip's layout (kiv.testing.tiny_clip).
#   python tools/misc/init_checkpoint.py configs/mmpretrain/<this file> zs.pth
#   python tools/test.py configs/mmpretrain/<this file> zs.pth
_base_ = [
    './kiv-adapter-vit-b14_zero-shot_in1k.py',
    '../_base_/models/kiv_adapter-vit-t14-reg4.py',  # the tiny student
]

student = 'checkpoints/kiv_vit-t14_student.pth'
text_embeddings = 'checkpoints/tiny_clip_tiny-in1k_text.safetensors'
num_classes = 2
crop_size = 56  # 4 x 14 px
metainfo = dict(classes=('n00000000', 'n00000001'))

data_preprocessor = dict(num_classes=num_classes)
model = dict(
    backbone=dict(
        # every architecture key of the tiny student replaces ViT-B/14's
        _base_.kiv_student_t14,
        base=dict(_base_.kiv_student_t14.base, checkpoint=None),
        init_cfg=dict(checkpoint=student)),
    head=dict(embeddings=text_embeddings, inherited=student,
              num_classes=num_classes, topk=(1, num_classes)))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=64, edge='short', backend='pillow'),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='PackInputs'),
]
val_dataloader = dict(
    batch_size=2, num_workers=0,
    dataset=dict(metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, num_classes))
test_evaluator = val_evaluator
