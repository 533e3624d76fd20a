"""Mixed precision: the distiller trains under bf16 and fp16 autocast,
and knowledge preservation survives it.

The contract (README, "Mixed precision"):

* the standardisers (statistics, PHI-S transform, forward, inverse), the
  knowledge-preservation skip path of the s2t heads and the losses compute in
  IEEE float32 under any autocast (autocast off, and no TF32 / bf16 kernels
  for float32 matmuls and convolutions, whatever the global precision
  switches say); the s2t heads and the standardisers return float32 under
  autocast;
* a teacher's kept head runs in the teacher's own precision whatever dtype
  it is fed (the inherited logits of a student under AMP);
* at step 0 under bf16 AMP the knowledge base's losses are as exact as in
  fp32 when its teacher runs in bf16 too (the recipe), and within
  :data:`BF16_STEP0_TOL` when it runs in fp32.

mmengine's ``AmpOptimWrapper`` refuses to be built without an accelerator and
its autocast helper takes only bf16 on the CPU: :class:`CPUAmpOptimWrapper`
is that wrapper (dynamic loss scaling, unscaling before gradient clipping)
with ``torch.autocast('cpu', dtype)``, driven by the real
``model.train_step``.
"""
from __future__ import annotations

import contextlib
import copy
import os.path as osp
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.structures import PixelData
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kiv  # noqa: F401
from kiv.models.connectors.s2t_heads import S2THead
from kiv.models.connectors.standardizers import (StatisticsStandardizer,
                                                 build_standardizer)
from kiv.registry import MODELS
from kiv.testing.paths import TINY_DISTILL_CFG as TINY_CFG
from kiv.testing.tiny_classifier import (colour_classifier_teacher,
                                         save_colour_classifier)

BF16, FP16 = torch.bfloat16, torch.float16
HALF = (BF16, FP16)
#: Step-0 tolerance of the knowledge base's losses (MSE on targets with unit
#: variance per channel) when its teacher runs in fp32 and the student under
#: bf16 autocast: the two compute the same network in different precisions,
#: so their outputs differ by bf16 rounding (unit roundoff 2^-8 relative)
#: accumulated over the blocks. The bound allows an RMS difference of two
#: bf16 ulps of the target scale, (2 * 2^-8)^2 = 2^-14 = 6.1e-5. Measured on
#: the tiny recipe (4 blocks, 56 px): summary 2.9e-7, dense 9.4e-6.
BF16_STEP0_TOL = 2.0**-14
#: Step-0 bound of the knowledge base's losses when the base teacher runs in
#: the same precision as the student (both fp32, or both bf16 under bf16
#: AMP): the same bound as the fp32 preservation test of
#: test_inheritance.py. Measured 0.0 in both cases; a skip path computing in
#: bf16 instead of float32 gives 6.7e-6 (summary) and 8.7e-6 (dense).
EXACT_TOL = 1e-9
#: aten ops that only view or cast their input (the dtype spy follows data
#: through them); every other op computes.
_VIEW_OPS = frozenset({
    '_to_copy', 'to', 't', 'view', '_unsafe_view', 'reshape', 'permute',
    'transpose', 'expand', 'unsqueeze', 'squeeze', 'detach', 'alias',
    'clone', 'contiguous', 'slice', 'select', 'as_strided', 'lift_fresh',
    'unbind', 'split', 'split_with_sizes', 'flatten'
})
_MATMUL_OPS = frozenset({'addmm', 'mm', 'bmm', 'baddbmm', 'matmul',
                         'linear', 'addmv', 'mv', 'dot'})
_CONV_OPS = frozenset({'convolution', '_convolution', 'mkldnn_convolution',
                       'conv2d'})


# --------------------------------------------------------------- helpers
def _images(n: int = 4, seed: int = 0, size: int = 56) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


def _config(teachers: dict, summaries: list[str], **model) -> Config:
    """The tiny recipe with other teachers (``dinov2`` stays the base).

    Args:
        teachers (dict): teacher name -> config.
        summaries (list[str]): the teachers with a summary, base first (the
            student's per-teacher summaries, where the student has them).
        **model: other ``model`` keys.

    Returns:
        Config: the whole config.
    """
    cfg = Config.fromfile(TINY_CFG)
    cfg.model.teachers = teachers
    cfg.model.latent.teachers = dict()
    cfg.model.student.summary_names = list(summaries)
    cfg.model.update(model)
    return cfg


def _tiny_teachers() -> dict:
    """The tiny recipe's teacher configs."""
    return copy.deepcopy(Config.fromfile(TINY_CFG).model.teachers)


def _base_summary(student) -> Tensor:
    """The student summary the knowledge base's head reads."""
    return student.summary_for('dinov2')


def _add_labels(batch: dict) -> dict:
    """Labels for the multi-task heads on every sample of a batch."""
    batch = copy.deepcopy(batch)
    for i, sample in enumerate(batch['data_samples']):
        h, w = batch['inputs'][i].shape[-2:]
        sample.set_metainfo(dict(img_shape=(h, w), pad_shape=(h, w)))
        sample.gt_label = torch.tensor([i % 3])
        g = torch.Generator().manual_seed(i)
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 2, (1, h, w), generator=g))
    return batch


@contextlib.contextmanager
def _reduced_fp32_kernels() -> Iterator[None]:
    """Allow bf16 kernels for float32 matmuls and convolutions on the CPU
    (what ``torch.set_float32_matmul_precision('medium')`` does for matmuls
    on CPUs with AMX / AVX512-BF16; TF32 is the CUDA analogue), restored
    afterwards."""
    switches = [torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv]
    saved = [s.fp32_precision for s in switches]
    for s in switches:
        s.fp32_precision = 'bf16'
    try:
        yield
    finally:
        for s, value in zip(switches, saved):
            s.fp32_precision = value


class CPUAmpOptimWrapper(AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` on the CPU.

    The same loss scaling (``torch.amp.GradScaler('cpu')``, dynamic),
    unscaling before gradient clipping and ``optim_context``, with
    ``torch.autocast('cpu', dtype)``: mmengine asserts an accelerator in
    ``__init__`` and its autocast helper accepts only bf16 on the CPU.

    Args:
        dtype (torch.dtype): autocast dtype (bf16 or fp16).
        **kwargs: ``OptimWrapper`` arguments (``optimizer``, ``clip_grad``).
    """

    def __init__(self, dtype: torch.dtype, **kwargs) -> None:
        with mock.patch('mmengine.optim.optimizer.amp_optimizer_wrapper.'
                        'is_cuda_available', return_value=True), \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')  # its CUDA scaler, replaced
            super().__init__(dtype=dtype, **kwargs)
        self.loss_scaler = torch.amp.GradScaler('cpu')

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with OptimWrapper.optim_context(self, model), \
                torch.autocast('cpu', dtype=self.cast_dtype):
            yield


class PrecisionSpy(TorchDispatchMode):
    """Records the dtypes of the aten ops run inside watched calls.

    :meth:`watch` wraps a method; its calls open a scope. In a scope
    without ``taint`` every op is recorded; with ``taint`` (tensors, e.g. a
    skip path's weight) only the ops that read those tensors or a view /
    cast of them. Ops run below the autograd and autocast dispatch keys, so
    the recorded dtypes are the ones the kernels computed in. For matmuls
    and convolutions the float32 kernel precision in force
    (``torch.backends.mkldnn.{matmul,conv}.fp32_precision``) is recorded too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[tuple[str, set | None]] = []
        #: ``(kind, op, input dtypes, output dtypes, fp32 precision)``
        self.ops: list[tuple] = []
        #: ``(kind, output dtype)`` of every watched call
        self.outputs: list[tuple[str, torch.dtype]] = []

    @staticmethod
    def _key(t: Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def watch(self, monkeypatch, obj: object, method: str, kind: str,
              taint: Callable[[], list[Tensor]] | None = None) -> None:
        """Open a scope named ``kind`` around every call of
        ``obj.method``."""
        original = getattr(obj, method)

        def wrapped(*args, **kwargs):
            keys = None if taint is None else \
                {self._key(t) for t in taint() if t is not None}
            self.scopes.append((kind, keys))
            try:
                out = original(*args, **kwargs)
            finally:
                self.scopes.pop()
            if isinstance(out, Tensor):
                self.outputs.append((kind, out.dtype))
            return out

        monkeypatch.setattr(obj, method, wrapped)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.scopes:
            return out
        kind, taint = self.scopes[-1]
        ins = [t for t in tree_leaves((args, kwargs))
               if isinstance(t, Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        name = func.overloadpacket.__name__.rstrip('_')
        if taint is not None:
            if not any(self._key(t) in taint for t in ins):
                return out
            if name in _VIEW_OPS:
                taint.update(self._key(t) for t in outs)
        precision = None
        if name in _MATMUL_OPS:
            precision = torch.backends.mkldnn.matmul.fp32_precision
        elif name in _CONV_OPS:
            precision = torch.backends.mkldnn.conv.fp32_precision
        floating = [t.dtype for t in ins if t.is_floating_point()]
        self.ops.append((kind, name,
                         [] if name in _VIEW_OPS else floating,
                         [t.dtype for t in outs if t.is_floating_point()],
                         precision if torch.float32 in floating else None))
        return out

    def violations(self) -> list[tuple]:
        """Recorded ops that read or wrote half precision, or ran a float32
        matmul / convolution with reduced-precision kernels."""
        return [op for op in self.ops
                if any(d in HALF for d in op[2] + op[3])
                or op[4] not in (None, 'ieee')]


# -------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def head_ckpt(distill_workdir) -> str:
    """The tiny colour classifier (a kept ``nn.Linear`` head)."""
    return save_colour_classifier(distill_workdir)[0]


@pytest.fixture(scope='module')
def caches(distill_workdir) -> dict[str, str]:
    """Teacher-feature caches of the knowledge base (8 images, one view,
    fp16 storage), written with its teacher in ``'bf16'`` (the recipe) and
    in ``'fp32'``."""
    from kiv.datasets.teacher_cache import TeacherCacheWriter
    out = {}
    for dtype in ('bf16', 'fp32'):
        base = _tiny_teachers().dinov2
        base.dtype = dtype
        cfg = _config(dict(dinov2=base), ['dinov2'])
        path = osp.join(distill_workdir, f'cache_dinov2_{dtype}')
        TeacherCacheWriter(cfg, path, views=1, dtype='fp16', shard_size=8,
                           num_workers=0, log=lambda msg: None).run()
        out[dtype] = path
    return out


def _cached_batches(cache_dir: str, size: int = 4) -> list[dict]:
    """Every view of a cache, as collated batches of ``size``."""
    from kiv.datasets.teacher_cache import TeacherCacheDataset
    dataset = TeacherCacheDataset(cache_dir)
    return [pseudo_collate([dataset[i] for i in range(s, s + size)])
            for s in range(0, len(dataset), size)]


def _cached_model(cache_dir: str, head_ckpt: str, **model) -> nn.Module:
    """Cached knowledge base + online classifier teacher with a kept head
    (logit distillation), the recipe's student options (SyncBN, stochastic
    depth, checkpointing), multi-task heads; statistics fixed from the
    cache's views, preserved heads initialised."""
    teachers = dict(
        dinov2=dict(type='kiv.CachedTeacher', cache_dir=cache_dir,
                    name='dinov2'),
        cls=colour_classifier_teacher(head_ckpt))
    cfg = _config(
        teachers, ['dinov2', 'cls'],
        losses=dict(logits=dict(type='kiv.LogitDistillationLoss',
                                temperature=2.0)),
        task_heads=dict(
            label=dict(head=dict(type='mmpretrain.LinearClsHead',
                                 num_classes=3, in_channels=64),
                       inputs='summary', gt_field='gt_label'),
            seg=dict(head=dict(type='mmseg.FCNHead', in_channels=64,
                               channels=16, num_convs=1, in_index=0,
                               num_classes=2, norm_cfg=dict(type='BN')),
                     inputs='pyramid', gt_field='gt_sem_seg',
                     loss_kwargs=dict(train_cfg=dict()), weight=0.5)),
        grad_share_interval=1, **model)
    cfg.model.student.update(norm_cfg=dict(type='SyncBN'),
                             drop_path_rate=0.1, with_cp=True)
    model = MODELS.build(cfg.model)
    model.init_weights()
    sums = None
    for batch in _cached_batches(cache_dir):
        data = model.data_preprocessor(batch, False)
        s = model.statistic_sums(data['inputs'], data['data_samples'])
        sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    model.load_statistics(sums)
    return model


def _online_model(head_ckpt: str, base_dtype: str = 'fp32',
                  standardize: str = 'phis',
                  logits: bool = False) -> nn.Module:
    """Online knowledge base (its teacher in ``base_dtype``) + classifier
    teacher with a kept head (logit distillation if ``logits``); statistics
    fixed."""
    base = _tiny_teachers().dinov2
    base.dtype = base_dtype
    losses = dict(logits=dict(type='kiv.LogitDistillationLoss',
                              temperature=2.0)) if logits else None
    cfg = _config(dict(dinov2=base, cls=colour_classifier_teacher(head_ckpt)),
                  ['dinov2', 'cls'], losses=losses)
    cfg.model.latent.standardize = standardize
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.load_statistics(model.statistic_sums(_images(8, 1)))
    return model


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize(
    'dtype', [BF16, pytest.param(FP16, marks=pytest.mark.slow)],
    ids=['bf16', 'fp16'])
def test_amp_train_step_with_logits_cache_and_task_heads(
        caches, head_ckpt, dtype):
    """The real ``model.train_step`` under AMP (bf16 and fp16): a cached
    knowledge base, an online teacher whose kept fp32 ``nn.Linear`` head
    gets the student's de-standardised prediction (logit distillation),
    multi-task heads, gradient shares, the recipe's student options. A kept
    head that does not cast its input to its own dtype fails here: the
    logit branch feeds it a bf16 tensor ("mat1 and mat2 must have the same
    dtype")."""
    model = _cached_model(caches['bf16'], head_ckpt)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    # no weight decay: a changed weight had a gradient
    wrapper = CPUAmpOptimWrapper(
        dtype, optimizer=torch.optim.AdamW(params.values(), lr=1e-3,
                                           weight_decay=0.0),
        clip_grad=dict(max_norm=3.0))
    batches = [_add_labels(b) for b in _cached_batches(caches['bf16'])]
    logs = [model.train_step(batch, wrapper) for batch in batches * 2]
    expected = {'loss_dinov2_summary', 'loss_dinov2_features',
                'loss_cls_summary', 'loss_cls_features', 'loss_cls_logits',
                'label.loss', 'seg.loss_ce', 'grad_share/dinov2',
                'grad_share/cls'}
    for log in logs:
        assert expected <= set(log), sorted(log)
        for key, value in log.items():
            assert torch.isfinite(torch.as_tensor(value)).all(), (key, log)
    changed = {n for n, p in params.items()
               if not torch.equal(p.detach(), before[n])}
    for prefix in ('student.interactions.', 'latent.summary_heads.cls.',
                   'latent.feature_heads.cls.', 'task_heads.label.',
                   'task_heads.seg.'):
        assert any(n.startswith(prefix) for n in changed), (prefix, dtype)
    assert all(p.dtype == torch.float32 for p in params.values())


@pytest.mark.parametrize('standardize', ['phis', 'channel'])
def test_fp32_islands_under_autocast(head_ckpt, monkeypatch, standardize):
    """A dtype spy under bf16 autocast, with bf16 kernels allowed for float32
    matmuls / convolutions (``set_float32_matmul_precision('medium')`` on
    this kind of CPU; TF32 on CUDA): every op of every standardiser call
    (statistics, transform, forward, inverse) and every op reading a
    preserved head's skip weights computes in IEEE float32 (or float64), and
    heads and standardisers return float32."""
    model = _online_model(head_ckpt, standardize=standardize)
    model.train()
    spy = PrecisionSpy()
    stds = [m for m in model.latent.modules()
            if isinstance(m, StatisticsStandardizer)]
    assert stds
    for std in stds:
        for method in ('batch_sums', '_refresh', 'forward', 'inverse'):
            spy.watch(monkeypatch, std, method, f'standardizer.{method}')
    heads = [m for m in model.latent.modules() if isinstance(m, S2THead)]
    skips = [h for h in heads if h.skip is not None]
    assert len(skips) == 2  # dinov2's summary and patch-grid heads
    for head in heads:
        taint = None if head.skip is None else \
            (lambda h=head: [h.skip.weight, h.skip.bias])
        spy.watch(monkeypatch, head, 'forward',
                  'skip' if taint else 'head', taint or (lambda: []))
    images = _images()
    with _reduced_fp32_kernels(), torch.autocast('cpu', dtype=BF16), spy:
        sums = model.statistic_sums(images)
        model.load_statistics(sums)  # recomputes every transform
        losses = model.loss(images)
        # student -> s2t heads -> inverse standardisation (inherited heads)
        inherited, _ = model.inherit(images, 'cls')
    kinds = {op[0] for op in spy.ops}
    assert {'skip', 'standardizer.batch_sums', 'standardizer._refresh',
            'standardizer.forward', 'standardizer.inverse'} <= kinds, kinds
    skip_ops = [op for op in spy.ops if op[0] == 'skip'
                and op[1] in _MATMUL_OPS]
    assert skip_ops, 'the spy saw no skip-path matmul'
    bad = spy.violations()
    assert not bad, bad[:10]
    outputs = {(k, d) for k, d in spy.outputs
               if k in ('standardizer.forward', 'standardizer.inverse',
                        'head', 'skip')}
    assert {k for k, _ in outputs} == {'standardizer.forward',
                                       'standardizer.inverse', 'head',
                                       'skip'}
    assert all(d == torch.float32 for _, d in outputs), sorted(outputs)
    assert inherited.summary.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())


@pytest.mark.parametrize('mode', ['phis', 'channel', 'none'])
def test_standardizer_dtypes_under_autocast(mode):
    """Under autocast a standardiser returns float32 for half input (the
    de-standardised prediction of a head) and equals the float32
    computation; outside autocast it keeps the input's dtype."""
    g = torch.Generator().manual_seed(0)
    std = build_standardizer(mode, 8)
    std.update(torch.randn(256, 8, generator=g) * 3 + 1)
    for x in (torch.randn(16, 8, generator=g),
              torch.randn(2, 8, 3, 5, generator=g)):
        half = x.to(BF16)
        with torch.autocast('cpu', dtype=BF16):
            y, back = std(half), std.inverse(half)
        assert y.dtype == back.dtype == torch.float32
        torch.testing.assert_close(y, std(half.float()), rtol=0, atol=0)
        torch.testing.assert_close(back, std.inverse(half.float()), rtol=0,
                                   atol=0)
        assert std(half).dtype == std.inverse(half).dtype == BF16


@pytest.mark.parametrize('teacher_dtype', ['fp32', 'bf16'])
def test_kept_head_takes_any_dtype(head_ckpt, teacher_dtype):
    """A teacher's head runs in the teacher's precision whatever it is fed:
    the bf16 output of a student under autocast into an fp32 teacher's
    ``nn.Linear`` gives the same logits as its float32 value."""
    cfg = colour_classifier_teacher(head_ckpt)
    cfg['dtype'] = teacher_dtype
    teacher = MODELS.build(cfg)
    summary = teacher(_images()).summary.to(BF16)
    with torch.autocast('cpu', dtype=BF16):
        logits = teacher.forward_head(summary)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, teacher.forward_head(summary.float()),
                               rtol=0, atol=0)


def test_fp32_compute_switches_and_restores():
    """``fp32_compute`` turns autocast off and forces IEEE float32 kernels
    (CUDA's TF32 switches are plain flags, checked here on the CPU), and
    restores every switch on exit."""
    from kiv.models.layers.precision import fp32_compute
    switches = {'cpu': [torch.backends.mkldnn.matmul,
                        torch.backends.mkldnn.conv],
                'cuda': [torch.backends.cuda.matmul,
                         torch.backends.cudnn.conv,
                         torch.backends.cudnn.rnn]}
    for device, objs in switches.items():
        saved = [o.fp32_precision for o in objs]
        try:
            for o in objs:
                o.fp32_precision = 'tf32'
            with warnings.catch_warnings(), \
                    torch.autocast('cpu', dtype=BF16):
                warnings.simplefilter('ignore')  # no CUDA on this machine
                with fp32_compute(device):
                    assert not torch.is_autocast_enabled(device)
                    assert [o.fp32_precision for o in objs] == \
                        ['ieee'] * len(objs)
                assert torch.is_autocast_enabled('cpu')
            assert [o.fp32_precision for o in objs] == ['tf32'] * len(objs)
        finally:
            for o, value in zip(objs, saved):
                o.fp32_precision = value
    # with bf16 kernels allowed, the island still gives IEEE results
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, 256,
                                                          generator=g)
    ref = F.linear(x.double(), w.double())
    with _reduced_fp32_kernels(), fp32_compute('cpu'):
        got = F.linear(x, w)
    assert (got.double() - ref).abs().max() < 1e-3


def _mismatch(std, student: Tensor, teacher: Tensor) -> float:
    """MSE between the standardised student and teacher outputs, computed
    in float64 from the standardiser's affine map: the loss a preserved
    head that adds no error of its own gives.

    Args:
        std: the standardiser.
        student (Tensor): ``(B, C)`` or ``(B, C, H, W)`` raw student output.
        teacher (Tensor): the teacher's, same shape.

    Returns:
        float: ``mean((W (student - teacher))^2)``.
    """
    weight, _ = std.affine()
    diff = (student.double() - teacher.double()).movedim(1, -1)
    return float((diff @ weight.double().T).square().mean())


@pytest.mark.parametrize('base_dtype', ['bf16', 'fp32'])
def test_knowledge_preserved_at_step_zero_under_bf16(head_ckpt, base_dtype):
    """Step 0 under bf16 autocast, in train mode.

    What "equal" means depends on the knowledge base teacher's own ``dtype``:

    * ``'bf16'`` (the recipe): teacher and student run the same network
      under the same autocast, so the student's summary and patch-grid
      level are bit-identical to the teacher's, and the float32 skip path
      reproduces the float32 standardiser: the base losses are below
      :data:`EXACT_TOL`, as in fp32 (measured 0.0; a skip path computing
      in bf16 gives about 9e-6);
    * ``'fp32'``: the student computes the same network in bf16, so its
      outputs differ by bf16 rounding: every summary entry within one bf16
      ulp (2^-8) of the summary's largest magnitude, base losses below
      :data:`BF16_STEP0_TOL` (measured 3.1e-7 summary, 9.0e-6 dense).

    In both cases the base losses equal, to 1 %, the float64 MSE between
    the standardised student and teacher outputs: the preserved heads add
    no error of their own (a skip path computing in bf16 makes the
    fp32-teacher losses 8.0e-6 / 1.7e-5). The purpose-specific teacher's
    losses are far from 0.
    """
    model = _online_model(head_ckpt, base_dtype=base_dtype)
    model.train()
    images = _images(4, 5)
    with torch.autocast('cpu', dtype=BF16):
        student = model.extract_student(images)
        teacher = model.teachers['dinov2'](images)
        losses = model.loss(images)
    summary = _base_summary(student)
    patches = student.features[model.student.patch_level]
    base = {k: float(losses[f'loss_dinov2_{k}'])
            for k in ('summary', 'features')}
    expected = {
        'summary': _mismatch(model.latent.summary_standardizers['dinov2'],
                             summary, teacher.summary),
        'features': _mismatch(
            model.latent.feature_standardizers['dinov2'][0], patches,
            teacher.features[0])}
    print(f'step 0, bf16 autocast, base teacher {base_dtype}: '
          f'base losses {base}, student-teacher mismatch {expected}, '
          f'max |summary diff| '
          f'{float((summary.float() - teacher.summary).abs().max()):.3g}')
    for key, value in base.items():
        assert abs(value - expected[key]) <= 1e-2 * expected[key] + \
            EXACT_TOL, (key, value, expected[key])
    if base_dtype == 'bf16':
        torch.testing.assert_close(summary.float(), teacher.summary, rtol=0,
                                   atol=0)
        torch.testing.assert_close(patches.float(), teacher.features[0],
                                   rtol=0, atol=0)
        assert max(base.values()) < EXACT_TOL, base
    else:
        scale = float(teacher.summary.abs().max())
        assert float((summary.float() - teacher.summary).abs().max()) \
            <= 2.0**-8 * scale
        assert max(base.values()) < BF16_STEP0_TOL, base
    assert float(losses['loss_cls_summary']) > 0.1
    assert float(losses['loss_cls_features']) > 0.1


@pytest.mark.parametrize('cache_dtype', ['bf16', 'fp32'])
def test_cached_base_targets_at_step_zero(caches, head_ckpt, cache_dtype):
    """Knowledge base targets from an fp16 cache, at step 0, in train mode,
    the student under the precision its teacher ran in when the cache was
    written: bf16 autocast for a ``'bf16'`` teacher (the recipe), fp32 for
    an ``'fp32'`` one.

    The cached targets reach the losses as float32 (stacking fp16 rows under
    CPU bf16 autocast used to fail in ``CachedTeacher``). The only step-0
    error left is the cache's fp16 storage rounding, ``|dx| <= max(2^-11
    |x|, 2^-25)`` per value (fp16: 11 significant bits, subnormal spacing
    2^-24; the teacher's outputs are float32 values even in bf16, whose
    residual stream is float32, so they are not exact in fp16 either).
    PHI-S is the scaled rotation ``alpha R U^T``, so the MSE on
    standardised targets is ``alpha^2 * mean(dx^2)``: the base losses are
    within ``alpha^2 * mean(max(2^-11 |x|, 2^-25)^2)``. Measured: bf16 cache
    3.8e-8 (summary) / 4.8e-8 (dense), fp32 cache 4.1e-8 / 4.8e-8; a skip
    path computing in bf16 adds about 7e-6 under bf16 AMP.
    """
    model = _cached_model(caches[cache_dtype], head_ckpt)
    model.train()
    batch = model.data_preprocessor(_cached_batches(caches[cache_dtype])[0],
                                    True)
    amp = torch.autocast('cpu', dtype=BF16, enabled=cache_dtype == 'bf16')
    with amp, torch.no_grad():
        targets = model.teachers['dinov2'](batch['inputs'],
                                           batch['data_samples'])
        losses = model.loss(batch['inputs'], batch['data_samples'])
    assert targets.summary.dtype == torch.float32
    assert all(f.dtype == torch.float32 for f in targets.features)
    base = {k: float(losses[f'loss_dinov2_{k}'])
            for k in ('summary', 'features')}
    bounds = {}
    for key, x, std in (
            ('summary', targets.summary,
             model.latent.summary_standardizers['dinov2']),
            ('features', targets.features[0],
             model.latent.feature_standardizers['dinov2'][0])):
        weight, _ = std.affine()
        alpha2 = float(weight.double().square().sum()) / weight.shape[0]
        err = torch.maximum(x.double().abs() * 2.0**-11,
                            torch.full_like(x, 2.0**-25, dtype=torch.float64))
        bounds[key] = alpha2 * float(err.square().mean()) * (1 + 2.0**-10)
    print(f'step 0 from the {cache_dtype} cache: base losses {base}, '
          f'fp16 rounding bounds {bounds}')
    for key, bound in bounds.items():
        assert base[key] <= bound, (key, base[key], bound)
    assert float(losses['loss_cls_summary']) > 0.1


def test_preservation_in_train_mode_does_not_read_out_norms(distill_workdir):
    """fp32, train mode with the recipe's SyncBN output norms in batch-stat
    mode and stochastic depth: the knowledge base's losses are 0 and its
    targets are read from the summary and the patch-grid level, which do
    not go through ``out_norms`` (or any other norm of the adapter): making
    every adapter norm output 3x + 1 changes the pyramid (and the
    purpose-specific teacher's dense loss) but not one bit of the base
    path."""
    teachers = _tiny_teachers()
    del teachers['detector']
    cfg = _config(teachers, ['dinov2', 'clip'], grad_share_interval=0)
    cfg.model.student.update(norm_cfg=dict(type='SyncBN'),
                             drop_path_rate=0.1)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.load_statistics(model.statistic_sums(_images(8, 1)))
    model.train()
    norms = [m for m in model.student.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(any(m is n for n in norms) and m.training
               for m in model.student.out_norms)
    images = _images(4, 7)

    def run():
        torch.manual_seed(0)  # the same stochastic-depth draws
        student = model.extract_student(images)
        torch.manual_seed(0)
        return student, model.loss(images)

    student, losses = run()
    assert float(losses['loss_dinov2_summary']) < EXACT_TOL
    assert float(losses['loss_dinov2_features']) < EXACT_TOL
    handles = [m.register_forward_hook(lambda m, a, out: out * 3 + 1)
               for m in norms]
    try:
        moved, moved_losses = run()
    finally:
        for h in handles:
            h.remove()
    level = model.student.patch_level
    torch.testing.assert_close(_base_summary(moved), _base_summary(student),
                               rtol=0, atol=0)
    torch.testing.assert_close(moved.features[level],
                               student.features[level], rtol=0, atol=0)
    for key in ('loss_dinov2_summary', 'loss_dinov2_features'):
        assert float(moved_losses[key]) == float(losses[key]), key
    assert not torch.equal(moved.features[0], student.features[0])
    assert float(moved_losses['loss_clip_features']) != \
        float(losses['loss_clip_features'])
