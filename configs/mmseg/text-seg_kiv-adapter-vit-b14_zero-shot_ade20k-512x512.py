# Open-vocabulary (zero-shot) ADE20K segmentation with the inherited CLIP:
# no training, no labels seen. The student's stride-16 map goes through the
# inherited path of the CLIP teacher's text-space level (MaskCLIP's value
# path, `text_space` in the distillation recipe: s2t dense head -> inverse
# standardisation) and every pixel is scored against CLIP text embeddings
# of the 150 class names (cosine x 100). mIoU.
# Files (README "Zero-shot and open-vocabulary"):
#   student: python tools/export_student.py work_dirs/<distill run>/\
#       iter_100000.pth checkpoints/kiv_vit-b14_student.pth --keep-heads
#   text:    python tools/misc/text_embeddings.py --tower <CLIP file> \
#       --classes ade20k --width 512 \
#       --out checkpoints/clip_vit-b16_ade20k_text.safetensors
# Evaluate (tools/test.py does not initialise a model: write it once):
#   python tools/misc/init_checkpoint.py configs/mmseg/<this file> \
#       work_dirs/zero-shot_ade20k/zero_shot.pth
#   python tools/test.py configs/mmseg/<this file> \
#       work_dirs/zero-shot_ade20k/zero_shot.pth
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the kiv student
]
# kiv.MODELS imports the zero-shot heads on its first lookup
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)

student = 'checkpoints/kiv_vit-b14_student.pth'  # exported --keep-heads
text_embeddings = 'checkpoints/clip_vit-b16_ade20k_text.safetensors'
embed_dim = 768
num_classes = 150

model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],  # the student's, as distilled
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255),
    backbone=dict(
        # the student (configs/_base_/models/kiv_adapter-vit-b14-reg4.py);
        # its base's weights come with the exported student
        _base_.kiv_student_b14,
        base=dict(_base_.kiv_student_b14.base, checkpoint=None),
        # the pyramid only (the summaries' global tokens are skipped with a
        # warning, Pretrained init is non-strict)
        with_global_token=False,
        summary_names=None,
        out_type='pyramid',
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=student)),
    decode_head=dict(
        type='kiv.TextSegHead',
        embeddings=text_embeddings,
        inherited=student,  # its inherited_heads: the CLIP s2t path
        teacher='clip',
        level=-1,  # the CLIP teacher's text-space level (its last)
        in_channels=embed_dim,
        in_index=2,  # stride 16, the level CLIP is distilled on
        num_classes=num_classes,
        align_corners=False),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# evaluation only
train_dataloader = None
train_cfg = None
optim_wrapper = None
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
