# The tiny recipe distilled from its teacher-feature cache: no teacher is
# built, loaded or run during training (docs/teacher_cache.md).
#   python tools/cache_teachers.py <this config> --views 2    # once
#   python tools/train.py <this config>
# The cache holds 2 fixed views (crop box + flip) per image: the student
# sees exactly the views its cached targets came from, and the standardiser
# statistics are the exact ones of all cached targets (fixed before step 0).
# Validation is off in cached runs (it compares with the real teachers): run
# tools/test.py with the base config.
_base_ = './kiv_adapter-vit-t14-reg4_1xb4-20it_tiny-coco-images.py'

# the one switch: tools/cache_teachers.py writes here, tools/train.py reads
teacher_cache = 'work_dirs/teacher_cache/kiv_adapter-vit-t14-reg4_tiny-coco'
