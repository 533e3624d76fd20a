"""The cache written from the tiny distillation config: targets equal the
online teachers' for the same view, exact statistics, the disk estimate, and
refusals of caches that belong to another setup."""
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate

from kiv.datasets.teacher_cache import (TeacherCacheDataset,
                                        TeacherCacheError, load_statistics,
                                        read_index, use_teacher_cache)
from kiv.registry import MODELS
from kiv.testing.paths import in_dir
from kiv.testing.tiny_cache import NUM_IMAGES, SHARD_SIZE, VIEWS, tiny_cfg


@pytest.fixture(scope='module')
def online(cache):
    """The online distiller of the tiny config (real teachers)."""
    with in_dir(cache['root']):
        model = MODELS.build(tiny_cfg().model)
    return model.eval()


def _all_targets(cache):
    """Every stored target, stacked in sample order (float32)."""
    with in_dir(cache['root']):  # image paths are relative to it
        ds = TeacherCacheDataset(cache['dir'])
    rows = [ds.targets(i) for i in range(len(ds))]
    return {k: torch.stack([r[k] for r in rows]).float() for k in rows[0]}


def test_index_and_layout(cache):
    index = cache['index']
    assert index['complete'] and index['views'] == VIEWS
    assert index['num_shards'] == -(-NUM_IMAGES // SHARD_SIZE)
    assert index['num_samples'] == NUM_IMAGES * VIEWS
    assert set(index['teachers']) == {'dinov2', 'clip', 'detector'}
    det = index['teachers']['detector']
    assert det['summary_dim'] is None  # dense-only teacher
    assert det['grids'] == [[8, 8], [4, 4], [2, 2]]
    assert index['teachers']['dinov2']['grids'] == [[4, 4]]
    with in_dir(cache['root']):  # image paths are relative to it
        ds = TeacherCacheDataset(cache['dir'])
    assert len(ds) == NUM_IMAGES * VIEWS
    seen = [(ds.sample_info(i)['image_index'], ds.sample_info(i)['view'])
            for i in range(len(ds))]
    assert seen == [(i, v) for i in range(NUM_IMAGES) for v in range(VIEWS)]
    # no pickle: a safetensors shard is a json header + raw tensor bytes
    with open(osp.join(cache['dir'], 'shard-00000.safetensors'), 'rb') as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
    assert header['__metadata__']['cache_id'] == index['cache_id']
    assert header['target.clip.summary']['dtype'] == 'F16'
    assert header['view.box']['shape'] == [SHARD_SIZE * VIEWS, 4]
    assert all(s['num_samples'] == s['num_images'] * VIEWS
               for s in index['shards'])


def test_cached_targets_equal_online_targets(cache, online):
    """(1) For the same view, the CachedTeacher gives the online teacher's
    outputs up to fp16 rounding, through the real data path."""
    from kiv.models.teachers import CachedTeacher
    with in_dir(cache['root']):
        ds = TeacherCacheDataset(cache['dir'])
        batch = pseudo_collate([ds[i] for i in range(len(ds))])
    data = online.data_preprocessor(batch, False)
    images, samples = data['inputs'], data['data_samples']
    flips = [s.metainfo['view_params']['flip'] for s in samples]
    assert any(flips) and not all(flips)
    for name, teacher in online.teachers.items():
        cached = CachedTeacher(cache['dir'], name)
        assert cached.summary_dim == teacher.summary_dim
        assert cached.feature_dims == teacher.feature_dims
        assert cached.feature_strides == teacher.feature_strides
        assert cached.head_layer is None
        got = cached(images, data_samples=samples)
        ref = teacher(images)
        pairs = list(zip(got.features, ref.features))
        if ref.summary is None:
            assert got.summary is None
        else:
            pairs.append((got.summary, ref.summary))
        for g, r in pairs:
            assert g.dtype == torch.float32 and g.shape == r.shape
            # fp16 rounding: 11 significant bits (relative 2^-11), and
            # subnormals below 2^-14 are spaced 2^-24 apart; 2x for the
            # batch-size dependence of the fp32 forward, whose absolute
            # noise follows the tensor's scale (matters near zero)
            atol = max(2**-24, 2**-20 * float(r.abs().max()))
            torch.testing.assert_close(g, r, rtol=2**-10, atol=atol)


def test_replayed_view_is_the_config_pipeline_image(cache):
    """A cached view without flip is pixel-identical to the tiny config's
    own pipeline (LoadImage + mmcv.Resize) output for that image."""
    from mmengine.dataset import Compose
    with in_dir(cache['root']):
        ds = TeacherCacheDataset(cache['dir'])
        pipeline = Compose(tiny_cfg().train_pipeline[:2])  # load + Resize
        for i in range(len(ds)):
            item = ds[i]
            info = ds.sample_info(i)
            if info['view_params']['flip']:
                continue
            ref = pipeline(dict(img_path=info['img_path']))['img']
            np.testing.assert_array_equal(
                item['inputs'].permute(1, 2, 0).numpy(), ref)
            return
    pytest.fail('no unflipped view in the cache')


def test_statistics_equal_direct_statistics(cache, online):
    """(5) The stats file equals the statistics of all stored targets."""
    index = cache['index']
    sums = load_statistics(osp.join(cache['dir'], 'statistics.safetensors'),
                           index['cache_id'])
    # every stored target at once, in float64: the reference
    targets = {k: v.double() for k, v in _all_targets(cache).items()}
    from kiv.structures import FeatureOutput
    outputs = {}
    for name, entry in index['teachers'].items():
        summary = targets.get(f'{name}.summary')
        feats = tuple(targets[f'{name}.features.{i}']
                      for i in range(len(entry['feature_dims'])))
        outputs[name] = FeatureOutput(summary, feats)
    direct = online.latent.statistic_sums(outputs)
    assert set(direct) == set(sums) == set(online.latent.statistic_keys())
    for key, value in direct.items():
        # the cache sums float32 Gram matrices of its batches in float64
        torch.testing.assert_close(sums[key], value, rtol=1e-6,
                                   atol=1e-6 * float(value.abs().max()))
    n = NUM_IMAGES * VIEWS
    assert sums['dinov2.summary'][0] == n
    assert sums['detector.features.0'][0] == n * 8 * 8
    # ... and they load into the model exactly
    online.load_statistics(sums)
    std = online.latent.summary_standardizers['clip']
    x = targets['clip.summary'].double()
    torch.testing.assert_close(std.mean, x.mean(0))


def test_estimate_equals_bytes_written(cache):
    """(4) The up-front estimate is the bytes written, up to the json
    headers of the safetensors files."""
    est = cache['writer'].estimate()
    index = cache['index']
    written = sum(s['bytes'] for s in index['shards'])
    headers = written - est['total']
    assert 0 <= headers <= index['num_shards'] * 8192, (written, est)
    stats_file = osp.getsize(osp.join(cache['dir'],
                                      'statistics.safetensors'))
    assert 0 <= stats_file - est['statistics'] <= 8192
    assert est['per_view'] == index['bytes_per_view']
    report = cache['writer'].report()
    assert 'per view' in report and 'total' in report
    assert f'{NUM_IMAGES} images x {VIEWS} views, fp16' in report


def test_cache_of_other_teachers_is_refused(cache):
    cfg = tiny_cfg()
    cfg.model.teachers.clip.input_size = 48
    with pytest.raises(TeacherCacheError,
                       match="teacher 'clip' config differs"):
        use_teacher_cache(cfg, cache['dir'])
    cfg = tiny_cfg()
    cfg.model.latent.standardize = 'channel'
    with pytest.raises(TeacherCacheError, match="standardize='channel'"):
        use_teacher_cache(cfg, cache['dir'])
    # a run that estimates its own statistics (standardize=None): only the
    # teachers are checked
    from kiv.models.distillers.teacher_cache import cached_teachers
    teachers = tiny_cfg().model.teachers
    assert set(cached_teachers(teachers, cache['dir'],
                               standardize=None)) == set(teachers)
    teachers.clip.input_size = 48
    with pytest.raises(TeacherCacheError,
                       match="teacher 'clip' config differs"):
        cached_teachers(teachers, cache['dir'], standardize=None)
    cfg = tiny_cfg()
    cfg.train_pipeline[1]['scale'] = (64, 64)
    cfg.train_dataloader.dataset.pipeline[1]['scale'] = (64, 64)
    with pytest.raises(TeacherCacheError, match='gives views'):
        use_teacher_cache(cfg, cache['dir'])
    cfg = tiny_cfg()
    cfg.model.teachers['sam'] = cfg.model.teachers.clip
    with pytest.raises(TeacherCacheError,
                       match="teacher 'sam' is not cached"):
        use_teacher_cache(cfg, cache['dir'])


def test_writer_refuses_to_extend_a_cache_of_another_setup(cache):
    from kiv.datasets.teacher_cache import TeacherCacheWriter
    with in_dir(cache['root']):
        writer = TeacherCacheWriter(tiny_cfg(), cache['dir'], views=3,
                                    shard_size=SHARD_SIZE,
                                    log=lambda msg: None)
        with pytest.raises(TeacherCacheError,
                           match='views per image: cache 2, now 3'):
            writer.run()
    assert read_index(cache['dir'])['complete']  # untouched


def test_incomplete_or_missing_cache_messages(cache, tmp_path):
    with pytest.raises(TeacherCacheError, match='does not exist'):
        read_index(str(tmp_path))
    index = dict(cache['index'], complete=False)
    (tmp_path / 'index.json').write_text(json.dumps(index))
    with pytest.raises(TeacherCacheError, match='is incomplete'):
        TeacherCacheDataset(str(tmp_path))


def test_cached_teacher_errors(cache):
    from mmengine.structures import BaseDataElement

    from kiv.models.teachers import CachedTeacher
    with pytest.raises(TeacherCacheError, match="'sam' is not in the cache"):
        CachedTeacher(cache['dir'], 'sam')
    teacher = CachedTeacher(cache['dir'], 'clip')
    images = torch.zeros(1, 3, 56, 56)
    with pytest.raises(TeacherCacheError, match='cannot run on images'):
        teacher(images)
    other = BaseDataElement(metainfo=dict(teacher_cache='0' * 16))
    with pytest.raises(TeacherCacheError, match='comes from cache'):
        teacher(images, data_samples=[other])
    mine = BaseDataElement(metainfo=dict(teacher_cache=teacher.cache_id))
    with pytest.raises(TeacherCacheError, match="no cached target"):
        teacher(images, data_samples=[mine])
    assert sum(p.numel() for p in teacher.parameters()) == 0


def test_deleted_shard_is_rewritten_and_statistics_recomputed(cache,
                                                              tmp_path):
    """A shard deleted from a complete cache is redone by the same command;
    the other shards' statistics (their side files are gone once a cache is
    complete) are recomputed from their stored targets."""
    import shutil

    from safetensors.torch import load_file

    from kiv.datasets.teacher_cache import TeacherCacheWriter
    out = str(tmp_path / 'copy')
    shutil.copytree(cache['dir'], out)
    assert not [f for f in os.listdir(out) if '.stats.' in f]
    original = load_file(osp.join(out, 'shard-00001.safetensors'))
    os.remove(osp.join(out, 'shard-00001.safetensors'))
    log = []
    with in_dir(cache['root']):
        writer = TeacherCacheWriter(tiny_cfg(), out, views=VIEWS,
                                    shard_size=SHARD_SIZE, log=log.append)
        index = writer.run()
        assert index['complete'] and index['cache_id'] == \
            cache['index']['cache_id']
        assert any('recomputing the statistics of shard-00000' in m
                   for m in log)
        redone = load_file(osp.join(out, 'shard-00001.safetensors'))
        assert all(torch.equal(original[k], redone[k]) for k in original)
        stats = [load_statistics(osp.join(d, 'statistics.safetensors'))
                 for d in (cache['dir'], out)]
        for key, value in stats[0].items():
            torch.testing.assert_close(
                stats[1][key], value, rtol=1e-6,
                atol=1e-6 * float(value.abs().max()))
        assert not [f for f in os.listdir(out) if '.stats.' in f]
        log.clear()
        writer.run()  # nothing to do
    assert any('complete already' in m for m in log)


def test_missing_images_are_skipped_with_their_own_targets(cache,
                                                           private_root):
    """An image deleted after caching: its views are replaced by the next
    sample, whose targets come with it; a moved image folder is named."""
    root = osp.join(private_root, 'data', 'coco', 'train2017')
    ds = TeacherCacheDataset(cache['dir'], img_root=root)
    os.remove(ds.sample_info(2)['img_path'])  # image 1 (views 2 and 3)
    item = ds[2]
    meta = item['data_samples'].metainfo
    assert (meta['cache_image'], meta['cache_view']) == (2, 0)
    assert len(meta['skipped_files']) == 2
    targets = item['data_samples'].cached_targets
    assert all(torch.equal(targets[k], v) for k, v in ds.targets(4).items())
    with pytest.raises(TeacherCacheError, match='first cached image'):
        TeacherCacheDataset(cache['dir'], img_root=str(private_root))


def test_unreadable_image_is_skipped_while_caching(private_root, tmp_path):
    """A broken file is left out (its shard may end up empty), listed in
    the index, and the cache stays consistent; bf16 storage."""
    from kiv.datasets.teacher_cache import TeacherCacheWriter
    out = str(tmp_path / 'bf16')
    with in_dir(private_root):
        writer = TeacherCacheWriter(tiny_cfg(), out, views=1, dtype='bf16',
                                    shard_size=1, log=lambda msg: None)
        writer.prepare()
        broken = osp.join(writer._root, writer._paths[4])
        with open(broken, 'wb') as f:
            f.write(b'not an image')
        index = writer.run()
        assert index['shards'][4]['skipped'] == [4]
        assert index['shards'][4]['num_samples'] == 0
        assert index['num_samples'] == NUM_IMAGES - 1
        ds = TeacherCacheDataset(out)
        assert len(ds) == NUM_IMAGES - 1
        assert [ds.sample_info(i)['image_index'] for i in range(len(ds))] \
            == [0, 1, 2, 3, 5, 6, 7]
        item = ds[4]
        assert item['data_samples'].metainfo['cache_image'] == 5
        assert item['data_samples'].cached_targets['clip.summary'].dtype \
            == torch.bfloat16
    sums = load_statistics(osp.join(out, 'statistics.safetensors'))
    assert float(sums['clip.summary'][0]) == NUM_IMAGES - 1


def test_cached_teacher_keeps_the_real_head(cache, online):
    """``head_from``: the stand-in keeps only the real teacher's head, which
    answers like the online teacher's and passes gradients to its input
    (logit distillation from the cache); a head-less or mismatching config
    is refused."""
    from kiv.models.distillers.teacher_cache import cached_teachers
    from kiv.models.teachers import CachedTeacher
    cfg = dict(tiny_cfg().model.teachers.dinov2,
               head=dict(layer='norm', input='summary'))
    with in_dir(cache['root']):
        real = MODELS.build(cfg)
        cached = CachedTeacher(cache['dir'], 'dinov2', head_from=cfg)
    assert cached.head_layer == 'norm' and cached.head_input == 'summary'
    assert {k for k, _ in cached.named_parameters()} == {
        'kept_head.weight', 'kept_head.bias'}
    summary = torch.randn(3, cached.summary_dim, requires_grad=True)
    out = cached.forward_head(summary)
    torch.testing.assert_close(out, real.forward_head(summary))
    out.sum().backward()
    assert summary.grad is not None
    assert not any(p.requires_grad for p in cached.parameters())
    with pytest.raises(RuntimeError, match='has no head'):
        CachedTeacher(cache['dir'], 'clip').forward_head(summary)
    with in_dir(cache['root']), pytest.raises(TeacherCacheError,
                                              match='without a kept head'):
        CachedTeacher(cache['dir'], 'dinov2',
                      head_from=tiny_cfg().model.teachers.dinov2)
    with in_dir(cache['root']), pytest.raises(TeacherCacheError,
                                              match='holds'):
        CachedTeacher(cache['dir'], 'clip', head_from=cfg)
    # the distiller keeps the heads its logit losses read
    from kiv.models.distillers import KnowledgeInheritance
    teachers = dict(tiny_cfg().model.teachers, dinov2=cfg)
    logits = dict(logits=dict(type='kiv.LogitDistillationLoss'))
    assert KnowledgeInheritance.logit_teachers(teachers, logits, None) == \
        ['dinov2']
    assert KnowledgeInheritance.logit_teachers(
        teachers, logits, dict(dinov2=dict(logits=None))) == []
    assert KnowledgeInheritance.logit_teachers(teachers, None, None) == []
    with in_dir(cache['root']):
        configs = cached_teachers(tiny_cfg().model.teachers, cache['dir'],
                                  keep_heads=['clip'])
    assert configs['clip']['head_from'] == dict(
        tiny_cfg().model.teachers.clip)
    assert 'head_from' not in configs['dinov2']


def test_distiller_keeps_the_head_its_logit_loss_reads(tiny_root, tmp_path):
    """``KnowledgeInheritance(teacher_cache=...)`` with a ``logits`` loss:
    the cached stand-in of the teacher with a kept summary head keeps it,
    the loss is built and its gradient reaches the student; the other
    stand-ins stay weightless."""
    from kiv.datasets.teacher_cache import TeacherCacheWriter
    from kiv.models.teachers import CachedTeacher
    cfg = tiny_cfg()
    cfg.model.teachers.clip.head = dict(layer='norm', input='summary')
    cfg.model.losses = dict(logits=dict(type='kiv.LogitDistillationLoss'))
    out = str(tmp_path / 'cache')
    with in_dir(tiny_root):
        TeacherCacheWriter(cfg, out, views=1, dtype='fp16', shard_size=8,
                           num_workers=0, log=lambda msg: None).run()
        model = MODELS.build(dict(cfg.model, teacher_cache=out))
        ds = TeacherCacheDataset(out)
        batch = pseudo_collate([ds[i] for i in range(4)])
    assert all(isinstance(t, CachedTeacher) for t in model.teachers.values())
    assert model.teachers['clip'].head is not None
    assert model.teachers['dinov2'].head is None
    assert sum(p.numel() for n, t in model.teachers.items() if n != 'clip'
               for p in t.parameters()) == 0
    assert set(model.logit_losses) == {'clip'}
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert losses['loss_clip_logits'] > 0
    losses['loss_clip_logits'].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.student.parameters())


def _partial_cache(cache, out, teachers, **kwargs):
    """A cache of the tiny config's views with some of its teachers."""
    from kiv.datasets.teacher_cache import TeacherCacheWriter
    cfg = tiny_cfg()
    cfg.model.teachers = {n: cfg.model.teachers[n] for n in teachers}
    with in_dir(cache['root']):
        return TeacherCacheWriter(cfg, out, log=lambda msg: None,
                                  **kwargs).run()


def test_reused_teachers_are_copied_and_checked(cache, tmp_path):
    """--reuse: the teachers another cache of the same views holds are
    copied from it (another shard layout: image by image), checked on the
    first views, recorded in the index; the rest is computed as usual, the
    statistics cover everything, and a resume must reuse the same cache."""
    from safetensors.torch import load_file

    from kiv.datasets.teacher_cache import TeacherCacheWriter
    partial = str(tmp_path / 'partial')
    source = _partial_cache(cache, partial, ['dinov2', 'clip'],
                            views=VIEWS, dtype='fp16', shard_size=4)
    out = str(tmp_path / 'reused')
    log = []
    with in_dir(cache['root']):
        writer = TeacherCacheWriter(
            tiny_cfg(), out, views=VIEWS, dtype='fp16',
            shard_size=SHARD_SIZE, log=log.append, reuse=[partial])
        writer.prepare()  # runs the reused teachers once: the check
        calls = {}
        for name, teacher in writer.teachers.teachers.items():
            def counted(images, _name=name, _forward=teacher.forward):
                calls[_name] = calls.get(_name, 0) + 1
                return _forward(images)
            teacher.forward = counted
        index = writer.run()
    # while writing, only the teacher the other cache lacks runs
    assert set(calls) == {'detector'} and calls['detector'] > 0
    with in_dir(cache['root']):
        got = TeacherCacheDataset(out)
        ref = TeacherCacheDataset(cache['dir'])
        src = TeacherCacheDataset(partial)
    assert index['complete'] and index['cache_id'] != \
        cache['index']['cache_id']
    for name in ('dinov2', 'clip'):
        reused = index['teachers'][name]['reused_from']
        assert reused['cache_id'] == source['cache_id']
        assert 0 <= reused['check'] < 1e-3
        assert any(f'teacher {name!r}: outputs copied from' in m for m in log)
    assert 'reused_from' not in index['teachers']['detector']
    assert len(got) == len(ref) == NUM_IMAGES * VIEWS
    for i in range(len(got)):
        mine, theirs, computed = got.targets(i), src.targets(i), \
            ref.targets(i)
        for key, value in mine.items():
            if key.startswith('detector'):
                torch.testing.assert_close(value, computed[key], rtol=0,
                                           atol=0)
            else:  # copied bit for bit
                assert torch.equal(value, theirs[key]), (i, key)
                torch.testing.assert_close(value.float(),
                                           computed[key].float(),
                                           rtol=2**-9, atol=1e-4)
    # the reused outputs' rounding errors are the source cache's own
    for key, value in source['rounding_error'].items():
        assert index['rounding_error'][key] == value
    assert set(index['rounding_error']) == \
        set(cache['index']['rounding_error'])
    shard = load_file(osp.join(out, 'shard-00000.safetensors'))
    assert 'check.detector.features.0' in shard
    assert not any(k.startswith('check.clip') for k in shard)
    stats = [load_statistics(osp.join(d, 'statistics.safetensors'))
             for d in (cache['dir'], out)]
    for key, value in stats[0].items():
        torch.testing.assert_close(stats[1][key], value, rtol=2e-3,
                                   atol=2e-3 * float(value.abs().max()))
    # resuming without the same --reuse is another cache
    with in_dir(cache['root']):
        with pytest.raises(TeacherCacheError, match="teacher 'clip' is "
                           'reused from another cache'):
            TeacherCacheWriter(tiny_cfg(), out, views=VIEWS,
                               shard_size=SHARD_SIZE,
                               log=lambda msg: None).run()


def test_reuse_refuses_other_views_and_other_outputs(cache, tmp_path):
    from safetensors.torch import load_file, save_file

    from kiv.datasets.teacher_cache import TeacherCacheWriter
    one_view = str(tmp_path / 'one_view')
    _partial_cache(cache, one_view, ['clip'], views=1)
    with in_dir(cache['root']):
        writer = TeacherCacheWriter(tiny_cfg(), str(tmp_path / 'a'),
                                    views=VIEWS, log=lambda msg: None,
                                    reuse=[one_view])
        with pytest.raises(TeacherCacheError, match='written for other '
                           r'views \(views per image: 1 there, 2 here'):
            writer.prepare()
    # a cache whose stored clip outputs are not what this clip computes
    other = str(tmp_path / 'other')
    _partial_cache(cache, other, ['clip'], views=VIEWS)
    path = osp.join(other, 'shard-00000.safetensors')
    with open(path, 'rb') as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
    tensors = load_file(path)
    tensors['target.clip.features.0'] = -tensors['target.clip.features.0']
    save_file(tensors, path, header['__metadata__'])
    with in_dir(cache['root']):
        writer = TeacherCacheWriter(tiny_cfg(), str(tmp_path / 'b'),
                                    views=VIEWS, log=lambda msg: None,
                                    reuse=[other])
        with pytest.raises(TeacherCacheError, match="teacher 'clip' of "
                           'this config is not the one cached'):
            writer.prepare()
    assert not osp.exists(str(tmp_path / 'b'))  # nothing written
