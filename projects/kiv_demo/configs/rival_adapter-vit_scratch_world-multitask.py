# The demo's data-centric rivals: the student's architecture (the
# knowledge-base ViT layout + the same adapter), every weight random and
# trainable, trained jointly on the labels of one world split: image labels
# (linear head on the summary), boxes + instance masks (Mask R-CNN) and
# semantic maps (Semantic FPN), with the same heads, views and optimisation
# as the inherited student's multi-task training (the shared base; the demo
# builds ``model.tasks`` from ``task_models``). The demo sets the split
# (the user's labelled split for the rival of the claim, the teachers' split
# for the reference row), the inheritance run's optimizer steps and its
# labelled views per step (``kiv_demo.recipes.rival_cfg``). The backbone is
# then exported and probed like the inherited student.
_base_ = ['./_base_/adapter-vit-s8-reg4_world_schedule.py',
          './_base_/kb-vit-s8-reg4_adapter.py']
model = dict(
    type='kiv_demo.MultiTaskModel',
    backbone=dict(
        _base_.adapter,
        base=dict(_base_.kb_vit, checkpoint=None),  # from scratch
        freeze_base=False,
        out_type='both'),
    tasks=dict())
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='kiv.UnlabeledImageDataset',
        data_root='world/',
        ann_file='coco/annotations/instances_train2017.json',
        data_prefix=dict(img_path='coco/train2017'),
        pipeline={{_base_.labelled_view_pipeline}}))
