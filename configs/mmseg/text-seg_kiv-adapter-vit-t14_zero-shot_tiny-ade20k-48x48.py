# Tiny CPU version of text-seg_kiv-adapter-vit-b14_zero-shot_ade20k-512x512.py
# (inherited: the same text-space head on the inherited CLIP level, mIoU),
# with the tiny student (width 64, 4 blocks) on the tiny ADE20K layout of
# kiv.testing.make_tiny_ade20k('data/ade') (classes 'wall', 'building').
# The test (tests/test_zero_shot_tools.py) writes the files it names: a
# tiny student with inherited heads and text embeddings of a tiny random
# CLIP written in open_clip's layout (kiv.testing.tiny_clip).
#   python tools/misc/init_checkpoint.py configs/mmseg/<this file> zs.pth
#   python tools/test.py configs/mmseg/<this file> zs.pth
_base_ = [
    './text-seg_kiv-adapter-vit-b14_zero-shot_ade20k-512x512.py',
    '../_base_/models/kiv_adapter-vit-t14-reg4.py',  # the tiny student
]

student = 'checkpoints/kiv_vit-t14_student.pth'
text_embeddings = 'checkpoints/tiny_clip_tiny-ade20k_text.safetensors'
embed_dim = _base_.kiv_student_t14.base.model_kwargs.embed_dim  # 64
num_classes = 2
img_scale = (128, 48)
metainfo = dict(classes=('wall', 'building'))

model = dict(
    backbone=dict(
        # every architecture key of the tiny student replaces ViT-B/14's
        _base_.kiv_student_t14,
        base=dict(_base_.kiv_student_t14.base, checkpoint=None),
        with_global_token=False,
        summary_names=None,
        init_cfg=dict(checkpoint=student)),
    decode_head=dict(embeddings=text_embeddings, inherited=student,
                     in_channels=embed_dim, num_classes=num_classes))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
