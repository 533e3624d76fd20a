# Zero-shot ImageNet-1k classification with the inherited CLIP: no
# training, no labels seen. The student's CLIP summary goes through its
# inherited path (s2t summary head -> inverse standardisation: CLIP's
# 512-d projected image embedding, the recipe's CLIP summary) and is scored
# against CLIP text embeddings of the 1000 class names (80-template prompt
# ensemble), cosine x 100. Top-1 / top-5.
# Files (README "Zero-shot and open-vocabulary"):
#   student: python tools/export_student.py work_dirs/<distill run>/\
#       iter_100000.pth checkpoints/kiv_vit-b14_student.pth --keep-heads
#   text:    python tools/misc/text_embeddings.py --tower <CLIP file> \
#       --classes imagenet --width 512 \
#       --out checkpoints/clip_vit-b16_in1k_text.safetensors
# Evaluate (tools/test.py does not initialise a model: write it once):
#   python tools/misc/init_checkpoint.py configs/mmpretrain/<this file> \
#       work_dirs/zero-shot_in1k/zero_shot.pth
#   python tools/test.py configs/mmpretrain/<this file> \
#       work_dirs/zero-shot_in1k/zero_shot.pth
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/models/kiv_adapter-vit-b14-reg4.py',  # the kiv student
]
# kiv.MODELS imports the zero-shot heads on its first lookup
custom_imports = dict(imports=['kiv'], allow_failed_imports=False)

student = 'checkpoints/kiv_vit-b14_student.pth'  # exported --keep-heads
text_embeddings = 'checkpoints/clip_vit-b16_in1k_text.safetensors'
num_classes = 1000

model = dict(
    type='ImageClassifier',
    backbone=dict(
        # the student (configs/_base_/models/kiv_adapter-vit-b14-reg4.py);
        # its base's weights come with the exported student
        _base_.kiv_student_b14,
        base=dict(_base_.kiv_student_b14.base, checkpoint=None),
        summary='clip',  # the summary distilled towards CLIP
        out_type='global',
        init_cfg=dict(type='Pretrained', checkpoint=student)),
    neck=None,
    head=dict(
        type='kiv.ZeroShotClsHead',
        embeddings=text_embeddings,
        inherited=student,  # its inherited_heads: the CLIP s2t path
        teacher='clip',
        num_classes=num_classes,
        topk=(1, 5)))

# evaluation only
train_dataloader = None
train_cfg = None
optim_wrapper = None
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
val_cfg = dict()
test_cfg = dict()
