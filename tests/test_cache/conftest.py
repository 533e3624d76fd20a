"""Fixtures of the teacher-feature cache tests: a tiny COCO layout with the
tiny teachers, and one cache written from the tiny distillation config
(sizes in :mod:`kiv.testing.tiny_cache`)."""
import shutil

import pytest


@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory) -> str:
    """A directory with the tiny data and teachers (do not modify)."""
    from kiv.testing.tiny_cache import make_cache_root
    return make_cache_root(str(tmp_path_factory.mktemp('cache_root')))


@pytest.fixture(scope='session')
def cache(tiny_root, tmp_path_factory) -> dict:
    """A cache of the tiny config: 8 images x 2 views, fp16, 3 shards.

    Returns:
        dict: ``dir`` (absolute cache path), ``root`` (working directory of
        the config's relative paths), ``index`` and ``writer``.
    """
    from kiv.datasets.teacher_cache import TeacherCacheWriter
    from kiv.testing.paths import in_dir
    from kiv.testing.tiny_cache import SHARD_SIZE, VIEWS, tiny_cfg
    out = str(tmp_path_factory.mktemp('cache') / 'tiny')
    with in_dir(tiny_root):
        writer = TeacherCacheWriter(tiny_cfg(), out, views=VIEWS,
                                    dtype='fp16', shard_size=SHARD_SIZE,
                                    num_workers=0, log=lambda msg: None)
        index = writer.run()
    return dict(dir=out, root=tiny_root, index=index, writer=writer)


@pytest.fixture
def private_root(tiny_root, tmp_path) -> str:
    """A private copy of the tiny data and teachers (may be modified)."""
    root = str(tmp_path / 'root')
    shutil.copytree(tiny_root, root)
    return root
