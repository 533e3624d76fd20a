#!/usr/bin/env python
"""Export the inherited student backbone from a distillation checkpoint.

    python tools/export_student.py work_dirs/x/iter_N.pth student.pth \
        [--config configs/distill/x.py] [--keep-heads]

The result loads with ``weights_only=True`` into ``kiv.AdapterViT`` via
``init_cfg=dict(type='Pretrained', checkpoint='student.pth')``.
"""
import argparse
import json
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import kiv  # noqa: F401,E402
from kiv.apis.export import export_student  # noqa: E402
from kiv.apis.launch import require_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('checkpoint', help='distillation checkpoint')
    parser.add_argument('out', help='exported student checkpoint (.pth)')
    parser.add_argument('--config', help='distillation config (default: '
                        'the one stored in the checkpoint)')
    parser.add_argument('--keep-heads', action='store_true',
                        help='keep s2t heads and standardiser statistics '
                        'for inherited heads')
    args = parser.parse_args()
    require_file(args.checkpoint, 'checkpoint')
    if args.config:
        require_file(args.config, 'config file')
    meta = export_student(args.checkpoint, args.out, args.config,
                          args.keep_heads)
    print(f'exported student to {args.out}')
    print(json.dumps({k: v for k, v in meta.items() if k != 'student'},
                     indent=1))


if __name__ == '__main__':
    main()
