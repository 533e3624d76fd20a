"""A summary per teacher.

One shared summary made every teacher's summary head read the vector that
the knowledge base's preserved head pins to its CLS token. The student now
has one summary per teacher (``AdapterViT(summary_names=...)``), each
teacher's s2t head reads its own, and at step 0 they all are the base's CLS.
"""
import copy

import pytest
import torch
from mmengine.config import Config

import kiv  # noqa: F401
from kiv.models.backbones import AdapterViT
from kiv.registry import MODELS
from kiv.structures import FeatureOutput
from kiv.testing.paths import REAL_DISTILL_CFG, TINY_DISTILL_CFG

C = 64
TIMM_BASE = dict(type='timm', model_name='vit_small_patch14_reg4_dinov2',
                 model_kwargs=dict(img_size=56, embed_dim=C, depth=4,
                                   num_heads=2))


def _adapter(**kwargs) -> AdapterViT:
    torch.manual_seed(0)
    cfg = dict(base=TIMM_BASE, interaction_indexes=[[0, 0], [1, 1], [2, 2],
                                                    [3, 3]],
               conv_inplane=16, deform_num_heads=2, n_points=2)
    cfg.update(kwargs)
    return AdapterViT(**cfg)


def _open_gates(adapter: AdapterViT) -> None:
    """What training does: every gate away from 0."""
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith('gamma'):
                p.normal_(0, 0.5)


# ---------------------------------------------------------------- backbone
def test_named_summaries_start_as_the_base_cls_and_then_differ():
    adapter = _adapter(summary_names=['dinov2', 'clip', 'cls']).eval()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        out = adapter.forward_features(x)
        normed = adapter.base.norm(adapter.forward_base_tokens(x))
    assert list(out.summaries) == ['dinov2', 'clip', 'cls']
    for summary in out.summaries.values():
        assert torch.equal(summary, normed[:, 0])  # exactly the base's CLS
    assert torch.equal(out.summary, out.summaries['dinov2'])
    # each summary has its own token: own latent query and gate
    tokens = adapter.summary_tokens
    assert adapter.global_token is None and set(tokens) == {
        'dinov2', 'clip', 'cls'}
    assert tokens['clip'].pool.latent.data_ptr() != \
        tokens['cls'].pool.latent.data_ptr()
    _open_gates(adapter)
    with torch.no_grad():
        out = adapter.forward_features(x)
    pairs = [('dinov2', 'clip'), ('clip', 'cls'), ('dinov2', 'cls')]
    for a, b in pairs:
        assert not torch.allclose(out.summaries[a], out.summaries[b])


def test_one_teachers_gradient_reaches_only_its_own_summary_token():
    adapter = _adapter(summary_names=['dinov2', 'clip'])
    _open_gates(adapter)
    out = adapter.forward_features(torch.randn(2, 3, 56, 56))
    out.summaries['clip'].square().sum().backward()
    clip = [p.grad for p in adapter.summary_tokens['clip'].parameters()]
    dino = [p.grad for p in adapter.summary_tokens['dinov2'].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in clip)
    assert all(g is None or g.abs().sum() == 0 for g in dino)


@pytest.mark.parametrize('summary', [None, 'clip'])
def test_global_output_picks_the_named_summary(summary):
    """``out_type='global'`` with ``summary='clip'`` gives a downstream
    mmpretrain head CLIP's summary (default: the first name)."""
    adapter = _adapter(summary_names=['dinov2', 'clip'], out_type='both',
                       summary=summary).eval()
    _open_gates(adapter)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        feats = adapter.forward_features(x)
        outs = adapter(x)
    assert torch.equal(outs[-1], feats.summaries[summary or 'dinov2'])
    assert len(outs) == 5


def test_summary_options_are_checked():
    with pytest.raises(ValueError, match="summary='sam' is not one of"):
        _adapter(summary_names=['dinov2', 'clip'], summary='sam')
    with pytest.raises(ValueError, match='needs with_global_token=True'):
        _adapter(summary_names=['dinov2'], with_global_token=False)
    with pytest.raises(ValueError, match='distinct'):
        _adapter(summary_names=['clip', 'clip'])


def test_named_summaries_survive_export_and_downstream_load(tmp_path):
    """A downstream config listing the same names loads every weight."""
    adapter = _adapter(summary_names=['dinov2', 'clip'])
    _open_gates(adapter)
    path = str(tmp_path / 'student.pth')
    torch.save(dict(state_dict=adapter.state_dict()), path)
    cfg = dict(type='kiv.AdapterViT', base=TIMM_BASE,
               interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
               conv_inplane=16, deform_num_heads=2, n_points=2,
               summary_names=['dinov2', 'clip'], summary='clip',
               out_type='global',
               init_cfg=dict(type='Pretrained', checkpoint=path))
    down = MODELS.build(cfg)
    down.init_weights()
    down.eval()
    adapter.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(down(x)[0],
                           adapter.forward_features(x).summaries['clip'])


# ------------------------------------------------------------ latent space
def test_each_teacher_head_reads_its_own_summary():
    neck = MODELS.build(dict(
        type='kiv.SharedLatentSpace', student_summary_dim=8,
        student_feature_dims=[8], default_student_level=0, hidden_dim=16,
        teachers=dict(a=dict(summary_dim=4, feature_dims=[]),
                      b=dict(summary_dim=4, feature_dims=[]))))
    feats = (torch.randn(2, 8, 4, 4), )
    s_a, s_b = torch.randn(2, 8), torch.randn(2, 8)
    student = FeatureOutput(s_a, feats, dict(a=s_a, b=s_b))
    pred_b = neck.project(student, 'b', [])
    torch.testing.assert_close(pred_b.summary, neck.summary_heads['b'](s_b))
    pred_a = neck.project(student, 'a', [])
    torch.testing.assert_close(pred_a.summary, neck.summary_heads['a'](s_a))
    with pytest.raises(KeyError, match="no summary for teacher 'b'"):
        neck.project(FeatureOutput(s_a, feats, dict(a=s_a)), 'b', [])
    with pytest.raises(ValueError, match='summary dims'):
        neck.project(FeatureOutput(s_a, feats, dict(a=s_a,
                                                    b=torch.randn(2, 5))),
                     'a', [])


# --------------------------------------------------------------- distiller
def _distiller_cfg(**overrides) -> Config:
    cfg = Config.fromfile(TINY_DISTILL_CFG)
    cfg.model.update(overrides)
    return cfg


def test_recipes_give_every_summary_teacher_its_own_summary():
    """The real and tiny recipes list a summary per teacher with one; the
    real recipe's CLIP summary head reads CLIP's own summary."""
    for path, names in ((REAL_DISTILL_CFG, ['dinov2', 'clip']),
                        (TINY_DISTILL_CFG, ['dinov2', 'clip'])):
        model = Config.fromfile(path).model
        assert model.student.summary_names == names, path
        with_summary = [n for n, t in model.teachers.items()
                        if t.summary.get('type') != 'none']
        assert sorted(with_summary) == sorted(names), path


def test_distiller_routes_each_teacher_to_its_summary(distill_workdir):
    model = MODELS.build(_distiller_cfg().model)
    images = torch.rand(2, 3, 56, 56) * 255
    model.load_statistics(model.statistic_sums(images))
    _open_gates(model.student)
    model.eval()
    with torch.no_grad():
        student = model.extract_student(images)
        raw = model.teachers['clip'](images)
        pred = model.latent.project(student, 'clip',
                                    [f.shape[-2:] for f in raw.features])
        head = model.latent.summary_heads['clip']
        torch.testing.assert_close(pred.summary,
                                   head(student.summaries['clip']))
        assert not torch.allclose(pred.summary, head(student.summary))


def test_distiller_checks_summary_names(distill_workdir):
    cfg = _distiller_cfg()
    student = copy.deepcopy(cfg.model.student)
    student.pop('summary_names')
    with pytest.raises(ValueError, match=r"summary_names=\['dinov2', "
                       r"'clip'\] \(missing \['dinov2', 'clip'\]"):
        MODELS.build(dict(cfg.model, student=student))
    student.summary_names = ['dinov2', 'detector']
    with pytest.raises(ValueError, match=r"missing \['clip'\].*"
                       r"\['detector'\]"):
        MODELS.build(dict(cfg.model, student=student))
    # the ablation: one shared summary, asked for explicitly
    student.pop('summary_names')
    model = MODELS.build(dict(cfg.model, student=student,
                              summary_per_teacher=False))
    assert model.student.summary_tokens is None
    with pytest.raises(ValueError, match='contradicts'):
        MODELS.build(dict(cfg.model, summary_per_teacher=False))


def test_distiller_checks_per_teacher_setting_names(distill_workdir):
    """A misspelt teacher under latent.teachers stops the build."""
    cfg = _distiller_cfg()
    cfg.model.latent.teachers = dict(detecter=dict(student_levels=[1, 2,
                                                                   3]))
    with pytest.raises(KeyError, match=r"latent.teachers names unknown "
                       r"teachers \['detecter'\]; teachers are"):
        MODELS.build(cfg.model)
    cfg = _distiller_cfg(teacher_weights=dict(clipp=2.0))
    with pytest.raises(KeyError, match='clipp'):
        MODELS.build(cfg.model)
    cfg = _distiller_cfg(task_heads=dict(cls=dict(
        head=dict(type='mmpretrain.LinearClsHead', num_classes=3,
                  in_channels=C),
        gt_field='gt_label', summary='sam')))
    with pytest.raises(KeyError, match="summary='sam' is not one of"):
        MODELS.build(cfg.model)
