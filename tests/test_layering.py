"""The package layout shows the method: lower layers never import upper
ones (``kiv.models`` does not import ``kiv.engine``)."""
import ast
import os
import os.path as osp

import pytest

from conftest import REPO

#: layer -> packages it must not import (upper layers)
FORBIDDEN = {
    'utils': ('kiv.models', 'kiv.datasets', 'kiv.engine', 'kiv.evaluation',
              'kiv.demo'),
    'models': ('kiv.engine', 'kiv.demo'),
    'datasets': ('kiv.engine', 'kiv.demo'),
    'evaluation': ('kiv.engine', 'kiv.demo'),
    'engine': ('kiv.demo', ),
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
    for root, _, files in os.walk(osp.join(REPO, 'kiv', layer)):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = osp.join(root, name)
            bad += [(osp.relpath(path, REPO), mod) for mod in _imports(path)
                    if mod.startswith(FORBIDDEN[layer])]
    assert not bad, bad
