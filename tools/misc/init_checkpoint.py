#!/usr/bin/env python
"""Write the checkpoint of a config's model as initialised (no training).

    python tools/misc/init_checkpoint.py CONFIG OUT [--cfg-options k=v ...]

For configs evaluated with no training, such as the zero-shot classifier
and segmentor (student from its exported file, text embeddings and
inherited heads from theirs): ``tools/test.py`` loads a checkpoint and does
not initialise the model, so write it here first, then
``python tools/test.py CONFIG OUT``.
"""
import argparse
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmengine.config import DictAction  # noqa: E402

import kiv  # noqa: E402  (registers kiv.*)
from kiv.apis.init_checkpoint import write_init_checkpoint  # noqa: E402
from kiv.apis.launch import require_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('config', help='OpenMMLab config file')
    parser.add_argument('out', help='checkpoint to write (.pth)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args()
    require_file(args.config, 'config file')
    kiv.enable_safe_io()  # weights-only loading of init_cfg checkpoints
    meta = write_init_checkpoint(args.config, args.out, args.cfg_options)
    print(f'wrote {args.out} ({meta["num_tensors"]} tensors)')


if __name__ == '__main__':
    main()
