# The real-scale recipe distilled from a teacher-feature cache (Theia-style):
# DINOv2, CLIP, SAM and Mask R-CNN run once over ImageNet-1k, K views per
# image; distillation then runs the student only (docs/teacher_cache.md).
#   # disk use first (per view and total), nothing written:
#   python tools/cache_teachers.py <this config> --views 4 --dry-run
#   # 8 GPUs: each rank writes its share of the shards; resumable
#   python -m torch.distributed.run --nproc_per_node 8 \
#       tools/cache_teachers.py <this config> --views 4 --launcher pytorch
#   bash tools/dist_train.sh <this config> 8
# The config is the run: it states the cache where it is read, so any entry
# point (kiv's, mmpretrain's or mmdet's tools/train.py, Runner.from_cfg)
# trains from the cache. The cached views are replays of the recipe's
# RandomResizedCrop + RandomFlip (kiv.ReplayView, stored crop box and
# flip): 4 fixed views per image instead of a fresh crop every epoch. At
# fp16 one view is about 3.1 MiB (mostly the detector's P2 level), i.e.
# about 15 TiB for 4 views of the 1.28M images: check --dry-run. Validation
# is off (it compares with the real teachers): run tools/test.py with the
# base config.
_base_ = ('./kiv_adapter-vit-b14-reg4_dinov2-clip-sam-maskrcnn_'
          '8xb64-100k_in1k.py')

# tools/cache_teachers.py writes here; tools/train.py --teacher-cache DIR or
# --cfg-options teacher_cache=DIR moves all three places below together
teacher_cache = 'work_dirs/teacher_cache/kiv_in1k_dinov2-clip-sam-maskrcnn'
# the teachers are checked against the cache and replaced by
# kiv.CachedTeacher (no weights); statistics fixed from the cache
model = dict(teacher_cache=teacher_cache)
# every cached view with its targets; `dataset` is the one the cache is
# written from (checked against the cache; its data_root is used)
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='kiv.TeacherCacheDataset',
        cache_dir=teacher_cache,
        dataset={{_base_.train_dataloader.dataset}}))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
