# The tiny recipe distilled from its teacher-feature cache: no teacher is
# built, loaded or run during training (docs/teacher_cache.md).
#   python tools/cache_teachers.py <this config> --views 2    # once
#   python tools/train.py <this config>
# The config is the run: it states the cache where it is read, so it trains
# from the cache under any entry point (kiv's, mmpretrain's or mmdet's
# tools/train.py, Runner.from_cfg). The cache holds 2 fixed views (crop box
# + flip) per image: the student sees exactly the views its cached targets
# came from, and the standardiser statistics are the exact ones of all
# cached targets (fixed when the model is built). Validation is off (it
# compares with the real teachers): run tools/test.py with the base config.
_base_ = './kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py'

# tools/cache_teachers.py writes here; tools/train.py --teacher-cache DIR or
# --cfg-options teacher_cache=DIR moves all three places below together
teacher_cache = 'work_dirs/teacher_cache/kiv_adapter-vit-t14-reg4_tiny-coco'
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
