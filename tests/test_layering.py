"""The package layout shows the method: lower layers never import upper
ones, and parts of the method stay apart.

From the bottom: ``kiv.utils`` -> ``kiv.fileio`` (the teacher-cache file
format) -> ``kiv.models`` and ``kiv.datasets`` (side by side: the models do
not import the datasets) -> ``kiv.evaluation`` -> ``kiv.engine`` (runtime
hooks, optimizers, wrappers) -> ``kiv.apis`` (the tools' side). Inside
``kiv.models``: ``layers`` are the building blocks of the others, and the
student (``backbones``) does not import the teachers. The demo
(``projects/kiv_demo``) sits beside the library and uses it as any user
does: nothing in ``kiv`` imports ``kiv_demo``. Imports inside functions
count too."""
import ast
import os
import os.path as osp

import pytest

from kiv.testing.paths import REPO

#: package under kiv/ -> packages it must not import
FORBIDDEN = {
    'utils': ('kiv.fileio', 'kiv.models', 'kiv.datasets', 'kiv.engine',
              'kiv.evaluation', 'kiv.apis'),
    'fileio': ('kiv.models', 'kiv.datasets', 'kiv.engine', 'kiv.evaluation',
               'kiv.apis'),
    'models': ('kiv.datasets', 'kiv.engine', 'kiv.evaluation', 'kiv.apis'),
    'models/layers': ('kiv.models.backbones', 'kiv.models.connectors',
                      'kiv.models.distillers', 'kiv.models.losses',
                      'kiv.models.necks', 'kiv.models.teachers',
                      'kiv.models.heads'),
    'models/backbones': ('kiv.models.teachers', 'kiv.models.distillers',
                         'kiv.models.heads'),
    # the zero-shot heads read the method's files; the method never needs
    # them (they import mmpretrain / mmseg)
    'models/connectors': ('kiv.models.heads', ),
    'models/teachers': ('kiv.models.heads', ),
    'models/distillers': ('kiv.models.heads', ),
    'datasets': ('kiv.engine', 'kiv.apis'),
    'evaluation': ('kiv.engine', 'kiv.apis'),
    'engine': ('kiv.apis', ),
}


def _imports(path: str) -> list[str]:
    """Absolute module names imported by a file (relative ones resolved)."""
    rel = osp.relpath(path, REPO)[:-3].replace(os.sep, '.')
    package = rel.rsplit('.', 1)[0]
    names = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit('.', node.level - 1)[0] \
                    if node.level > 1 else package
                names.append(f'{base}.{node.module}' if node.module
                             else base)
            else:
                names.append(node.module)
    return names


@pytest.mark.parametrize('layer', sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(layer):
    bad = []
    for root, _, files in os.walk(osp.join(REPO, 'kiv', *layer.split('/'))):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = osp.join(root, name)
            bad += [(osp.relpath(path, REPO), mod) for mod in _imports(path)
                    if mod.startswith(FORBIDDEN[layer])]
    assert not bad, bad


def test_the_library_does_not_import_the_demo():
    """``projects/kiv_demo`` imports kiv as a user would; no module of
    ``kiv`` imports ``kiv_demo``, and the installed package holds no
    demo."""
    bad = []
    for root, _, files in os.walk(osp.join(REPO, 'kiv')):
        for name in files:
            if name.endswith('.py'):
                path = osp.join(root, name)
                bad += [(osp.relpath(path, REPO), mod)
                        for mod in _imports(path)
                        if mod.split('.')[0] == 'kiv_demo']
    assert not bad, bad
    assert not osp.exists(osp.join(REPO, 'kiv', 'demo'))
