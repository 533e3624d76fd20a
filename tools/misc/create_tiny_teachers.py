#!/usr/bin/env python
"""Write the tiny random teacher checkpoints used by the tiny configs.

    python tools/misc/create_tiny_teachers.py [--out-dir data/tiny_teachers]
"""
import argparse
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from kiv.testing.tiny_teachers import create_tiny_teachers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--out-dir', default='data/tiny_teachers')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    for name, path in create_tiny_teachers(args.out_dir, args.seed).items():
        print(f'{name}: {path}')


if __name__ == '__main__':
    main()
