"""Unlabelled images for distillation: a folder, or a labelled set's list."""
from __future__ import annotations

import errno
import json
import logging
import os
import os.path as osp
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import mmengine.fileio as fileio
from mmengine.dataset import BaseDataset
from mmengine.fileio.backends import LocalBackend
from mmengine.logging import print_log

from kiv.registry import DATASETS
from .transforms import SKIP_CAUSES, SKIPPED_FILES, UnreadableImageError

#: file extensions scanned by default (matched case-insensitively)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')

#: why the folder scan skipped an entry (keys of ``scan_skipped``)
SCAN_SYMLINK_LOOP = 'symlink loop'
SCAN_ALIAS = 'symlink to a folder already scanned'
SCAN_UNREADABLE_FOLDER = 'unreadable folder'
SCAN_VANISHED = 'vanished during the scan'
SCAN_BROKEN_LINK = 'broken symlink'
SCAN_NOT_A_FILE = 'not a regular file'
SCAN_UNREADABLE_ENTRY = 'unreadable entry'

#: how many paths per cause the one scan warning line names
_SHOWN_PER_CAUSE = 3

#: annotation files read as a COCO json; anything else as an ImageNet-style
#: ``<path> [<label>]`` list unless its content starts with ``{``
_JSON_SUFFIXES = ('.json', )


@DATASETS.register_module()
class UnlabeledImageDataset(BaseDataset):
    """Images for distillation; labels, boxes and masks are ignored.

    The image list comes from one of:

    - a folder (``data_prefix['img_path']``, or ``data_root`` when that is
      empty) scanned recursively for ``extensions``, case-insensitively,
      skipping hidden files and folders (``.name``), sorted so the order is
      the same on every machine and rank. Symlinked folders are followed,
      each real folder once. The scan never stops on one bad entry: symlink
      loops, unreadable folders, entries that vanish while scanning and
      broken symlinks are skipped, counted in :attr:`scan_skipped` and named
      in ONE warning line (only an unreadable top folder is an error);
    - ``ann_file`` of a labelled dataset, whose image list is reused:

      - a COCO json (detected by the ``.json`` suffix or content starting
        with ``{``): ``images[].file_name``, relative to the image prefix;
      - an ImageNet-style meta file (mmpretrain's ``meta/train.txt``): one
        ``<path> <label>`` (or bare ``<path>``) per line, relative to the
        image prefix; the path must have one of ``extensions``.

    Images listed by ``ann_file`` are not checked at start-up (cheap for
    millions of files, e.g. ImageNet's 1.28M ``meta/train.txt``); a missing
    one is skipped at load time like any unreadable file (cause ``'missing
    file'``), as is a scanned file that disappears before it is read.

    Unreadable files never stop a run. When the pipeline raises
    :class:`~kiv.datasets.transforms.UnreadableImageError` (from
    ``kiv.LoadImageFromFileSafe``) or returns ``None``, the sample is
    replaced by the next index (wrapping around) until one loads, at most
    ``max_refetch`` times; the replaced paths are passed to the pipeline as
    ``results['skipped_files']`` and packed by ``kiv.PackImageInputs`` into
    the data sample's metainfo, with the cause of each in
    ``results['skip_causes']`` (e.g. ``'not decodable'``, ``'too many
    pixels'``, ``'missing file'``), so they reach the main process through
    the batch even from dataloader workers and
    :class:`~kiv.engine.hooks.BadImageReportHook` can report them by cause.
    This applies in ``test_mode`` too.

    Args:
        data_root (str): dataset root; joined with relative ``ann_file`` and
            ``data_prefix['img_path']``. Defaults to ``''``.
        data_prefix (dict | str): ``dict(img_path=...)`` (or that path as a
            string): the image folder, relative to ``data_root`` unless
            absolute. Defaults to ``dict(img_path='')`` (``data_root``).
        ann_file (str): optional COCO json or ImageNet-style meta file.
            Defaults to ``''`` (scan the folder).
        extensions (Sequence[str]): image suffixes, with the dot. Defaults
            to :data:`IMG_EXTENSIONS`.
        pipeline (Sequence[dict | Callable]): e.g. ``[dict(type=
            'kiv.LoadImageFromFileSafe'), dict(type='mmcv.Resize', scale=
            (224, 224)), dict(type='kiv.PackImageInputs')]``.
        backend_args (dict, optional): file backend arguments for listing
            and reading annotation files. Defaults to None (local).
        max_refetch (int): most consecutive replacements for one sample
            before a ``RuntimeError``. Defaults to 1000.
        **kwargs: other :class:`~mmengine.dataset.BaseDataset` arguments
            (``metainfo``, ``indices``, ``serialize_data``, ``test_mode``,
            ``lazy_init``, ``filter_cfg``).

    Attributes:
        scan_skipped (dict[str, list[str]]): what the folder scan skipped,
            ``cause -> paths`` (empty with ``ann_file``).

    Raises:
        FileNotFoundError: the image folder or ``ann_file`` does not exist.
        PermissionError: the image folder itself cannot be listed.
        ValueError: no images found, an unknown or malformed ``ann_file``,
            or a bad ``data_prefix``.
    """

    def __init__(self,
                 data_root: str = '',
                 data_prefix: Union[dict, str] = dict(img_path=''),
                 ann_file: str = '',
                 extensions: Sequence[str] = IMG_EXTENSIONS,
                 pipeline: Sequence[Union[dict, Callable]] = (),
                 backend_args: Optional[dict] = None,
                 max_refetch: int = 1000,
                 **kwargs) -> None:
        if isinstance(data_prefix, str):
            data_prefix = dict(img_path=data_prefix)
        if not isinstance(data_prefix, dict) or list(data_prefix) != [
                'img_path'
        ]:
            raise ValueError('UnlabeledImageDataset: data_prefix must be '
                             "dict(img_path=...) or a path string, got "
                             f'{data_prefix!r}')
        if isinstance(extensions, str):
            extensions = (extensions, )
        self.extensions = tuple(ext.lower() for ext in extensions)
        if not self.extensions or not all(
                ext.startswith('.') for ext in self.extensions):
            raise ValueError('UnlabeledImageDataset: extensions must be '
                             "suffixes with a dot, e.g. ('.jpg', '.png'), got "
                             f'{extensions!r}')
        self.backend_args = backend_args
        self.scan_skipped: Dict[str, List[str]] = {}
        super().__init__(ann_file=ann_file,
                         data_root=data_root,
                         data_prefix=data_prefix,
                         pipeline=list(pipeline),
                         max_refetch=max_refetch,
                         **kwargs)

    @property
    def img_dir(self) -> str:
        """str: the folder image paths are relative to."""
        return self.data_prefix['img_path'] or self.data_root

    def load_data_list(self) -> List[dict]:
        """List the images.

        Returns:
            list[dict]: one ``dict(img_path=...)`` per image.
        """
        if self.ann_file:
            rel_paths = self._read_ann_file()
        else:
            rel_paths = self._scan_folder()
        img_dir = self.img_dir
        return [
            dict(img_path=fileio.join_path(img_dir, p) if img_dir else p)
            for p in rel_paths
        ]

    def _has_image_suffix(self, path: str) -> bool:
        return path.lower().endswith(self.extensions)

    def _scan_folder(self) -> List[str]:
        """Relative paths of the images under :attr:`img_dir`, sorted."""
        img_dir = self.img_dir
        if not img_dir:
            raise ValueError('UnlabeledImageDataset: set data_root, '
                             "data_prefix=dict(img_path=...) or ann_file")
        if not fileio.isdir(img_dir, backend_args=self.backend_args):
            raise FileNotFoundError(
                f'UnlabeledImageDataset: image folder {img_dir!r} does not '
                'exist or is not a folder')
        backend = fileio.get_file_backend(img_dir,
                                          backend_args=self.backend_args)
        if isinstance(backend, LocalBackend):
            files, skipped = _walk_local(img_dir, self._has_image_suffix)
        else:  # object stores have no links or permissions per folder
            try:
                files = list(
                    fileio.list_dir_or_file(img_dir,
                                            list_dir=False,
                                            recursive=True,
                                            backend_args=self.backend_args))
            except OSError as err:
                raise OSError(f'UnlabeledImageDataset: cannot list image '
                              f'folder {img_dir!r}: {err}') from err
            skipped = {}
        rel_paths = sorted(p for p in files
                           if self._has_image_suffix(p) and not any(
                               part.startswith('.')
                               for part in p.split(osp.sep)))
        self.scan_skipped = {
            cause: [fileio.join_path(img_dir, p) for p in sorted(paths)]
            for cause, paths in sorted(skipped.items())
        }
        if self.scan_skipped:
            print_log(self.scan_summary(), logger='current',
                      level=logging.WARNING)
        if not rel_paths:
            raise ValueError(
                f'UnlabeledImageDataset: no image files '
                f'({", ".join(self.extensions)}) found under {img_dir!r}')
        return rel_paths

    def scan_summary(self) -> str:
        """One line naming what the folder scan skipped, by cause.

        Returns:
            str: e.g. ``"UnlabeledImageDataset: the scan of '/data' skipped
            2 entries: symlink loop: 1 (/data/a/loop); unreadable folder: 1
            (/data/locked)"``; says nothing was skipped when so.
        """
        num = sum(len(paths) for paths in self.scan_skipped.values())
        if not num:
            return (f'UnlabeledImageDataset: the scan of {self.img_dir!r} '
                    'skipped nothing')
        parts = []
        for cause, paths in self.scan_skipped.items():
            shown = ', '.join(paths[:_SHOWN_PER_CAUSE])
            more = (f', +{len(paths) - _SHOWN_PER_CAUSE} more'
                    if len(paths) > _SHOWN_PER_CAUSE else '')
            parts.append(f'{cause}: {len(paths)} ({shown}{more})')
        return (f'UnlabeledImageDataset: the scan of {self.img_dir!r} '
                f'skipped {num} entr{"y" if num == 1 else "ies"}: '
                + '; '.join(parts))

    def _read_ann_file(self) -> List[str]:
        """Image paths listed by :attr:`ann_file`, in file order."""
        ann_file = self.ann_file
        if not fileio.exists(ann_file, backend_args=self.backend_args):
            raise FileNotFoundError(
                f'UnlabeledImageDataset: ann_file {ann_file!r} does not '
                'exist')
        try:
            text = fileio.get_text(ann_file, backend_args=self.backend_args)
        except UnicodeDecodeError as err:
            raise ValueError(self._unknown_format(ann_file)) from err
        if ann_file.lower().endswith(
                _JSON_SUFFIXES) or text.lstrip().startswith('{'):
            paths = self._parse_coco(ann_file, text)
        else:
            paths = self._parse_meta_lines(ann_file, text)
        if not paths:
            raise ValueError(
                f'UnlabeledImageDataset: ann_file {ann_file!r} lists no '
                'images')
        return paths

    def _unknown_format(self, ann_file: str) -> str:
        return (f'UnlabeledImageDataset: unknown format of ann_file '
                f'{ann_file!r}; expected a COCO json (images[].file_name) or '
                "an ImageNet-style meta file ('<path> <label>' per line)")

    @staticmethod
    def _parse_coco(ann_file: str, text: str) -> List[str]:
        """``images[].file_name`` of a COCO json."""
        try:
            coco = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f'UnlabeledImageDataset: ann_file {ann_file!r} '
                             f'is not valid json: {err}') from err
        images = coco.get('images') if isinstance(coco, dict) else None
        if not isinstance(images, list):
            raise ValueError(f'UnlabeledImageDataset: ann_file {ann_file!r} '
                             "has no 'images' list (expected COCO format)")
        paths = []
        for i, image in enumerate(images):
            name = image.get('file_name') if isinstance(image, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f'UnlabeledImageDataset: ann_file {ann_file!r}: '
                    f"images[{i}] has no 'file_name' string")
            paths.append(name)
        return paths

    def _parse_meta_lines(self, ann_file: str, text: str) -> List[str]:
        """Paths of ``<path> [<label>]`` lines; the label is ignored."""
        paths = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            path = parts[0] if len(parts) == 2 and _is_int(parts[1]) else line
            if not self._has_image_suffix(path):
                raise ValueError(
                    f'{self._unknown_format(ann_file)}; line {lineno} '
                    f'{line!r} does not name a file with an image suffix '
                    f'{self.extensions}')
            paths.append(path)
        return paths

    def __getitem__(self, idx: int) -> dict:
        """Load sample ``idx``, replacing unreadable files by the next ones.

        Args:
            idx (int): sample index.

        Returns:
            dict: the pipeline output for the first readable index from
            ``idx`` on; the paths of the unreadable files it replaced are in
            ``results['skipped_files']`` and why in ``results['skip_causes']``
            (``data_samples.skipped_files`` / ``skip_causes`` after
            ``kiv.PackImageInputs``).

        Raises:
            RuntimeError: ``max_refetch`` + 1 consecutive files (or the
                whole dataset) are unreadable.
        """
        if not self._fully_initialized:
            self.full_init()
        num = len(self)
        skipped: List[str] = []
        causes: List[str] = []
        for offset in range(min(self.max_refetch + 1, num)):
            data_info = self.get_data_info((idx + offset) % num)
            path = data_info['img_path']
            data_info[SKIPPED_FILES] = list(skipped)
            data_info[SKIP_CAUSES] = list(causes)
            cause = 'rejected by the pipeline'
            try:
                data = self.pipeline(data_info)
            except UnreadableImageError as err:
                print_log(f'skipping unreadable image: {err}',
                          logger='current',
                          level=logging.DEBUG)
                data, cause = None, err.cause
            if data is not None:
                return data
            skipped.append(path)
            causes.append(cause)
        raise RuntimeError(
            f'UnlabeledImageDataset: {len(skipped)} consecutive images from '
            f'index {idx} could not be loaded (max_refetch='
            f'{self.max_refetch}), first: {skipped[:3]}; check the files '
            f'under {self.img_dir or self.ann_file!r} and the pipeline')


def _scan_cause(err: OSError, folder: bool) -> str:
    """The scan cause for an ``OSError`` met on a folder or an entry.

    Args:
        err (OSError): the error.
        folder (bool): it came from listing a folder (else from an entry).

    Returns:
        str: one of the ``SCAN_*`` causes.
    """
    if err.errno == errno.ELOOP:
        return SCAN_SYMLINK_LOOP
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return SCAN_VANISHED
    return SCAN_UNREADABLE_FOLDER if folder else SCAN_UNREADABLE_ENTRY


def _walk_local(root: str, wanted: Callable[[str], bool]
                ) -> Tuple[List[str], Dict[str, List[str]]]:
    """List the files under ``root`` without ever stopping on one entry.

    Depth-first with explicit stacks (no recursion limit), entries in name
    order. Symlinked folders are followed after the real tree, so each real
    folder (device, inode) is listed once and under its real path when it
    is inside ``root``; a link to a folder already listed is skipped, and a
    link to one of its own parents (a loop) ends there instead of raising
    ``ELOOP``. Hidden entries (``.name``) are not visited.

    Args:
        root (str): a local folder.
        wanted (Callable[[str], bool]): whether a file name is an image; only
            those are listed (or reported when broken).

    Returns:
        tuple: the relative paths of the wanted regular files (in no
        particular order) and ``cause -> relative paths`` of the skipped
        entries.

    Raises:
        PermissionError: ``root`` itself cannot be listed (other errors on
            ``root`` propagate as ``OSError`` naming it).
    """
    skipped: Dict[str, List[str]] = {}
    files: List[str] = []

    def skip(cause: str, rel: str) -> None:
        skipped.setdefault(cause, []).append(rel)

    root_stat = os.stat(root)
    root_key = (root_stat.st_dev, root_stat.st_ino)
    visited = {root_key}
    # (relative folder, identities of it and its parents)
    real: List[Tuple[str, frozenset]] = [('', frozenset([root_key]))]
    linked: List[Tuple[str, frozenset, str]] = []  # + the link's own path

    def enter(rel: str, path: str, ancestors: frozenset) -> None:
        """Queue a folder (``path`` is how it is reached) unless seen."""
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino)
        if key in ancestors:
            skip(SCAN_SYMLINK_LOOP, rel)
        elif key in visited:
            skip(SCAN_ALIAS, rel)
        else:
            visited.add(key)
            real.append((rel, ancestors | {key}))

    while real or linked:
        if not real:  # the real tree is done: follow one folder link
            rel, ancestors, path = linked.pop()
            try:
                enter(rel, path, ancestors)
            except OSError as err:
                skip(_scan_cause(err, folder=False), rel)
            continue
        rel_dir, ancestors = real.pop()
        folder = osp.join(root, rel_dir) if rel_dir else root
        entries = []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    entries.append(entry)
        except OSError as err:
            if not rel_dir:  # the top folder itself: nothing to train on
                if isinstance(err, PermissionError):
                    raise PermissionError(
                        err.errno, 'UnlabeledImageDataset: cannot list the '
                        f'image folder {root!r}: {err.strerror}') from err
                raise OSError(err.errno, 'UnlabeledImageDataset: cannot '
                              f'list the image folder {root!r}: '
                              f'{err.strerror}') from err
            skip(_scan_cause(err, folder=True), rel_dir)
        subfolders, links = [], []
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if name.startswith('.'):
                continue
            rel = osp.join(rel_dir, name) if rel_dir else name
            try:
                if entry.is_dir():  # follows symlinks
                    if entry.is_symlink():
                        links.append((rel, ancestors, entry.path))
                    else:
                        subfolders.append((rel, entry.path))
                    continue
                if not wanted(name):
                    continue
                if entry.is_file():
                    files.append(rel)
                elif entry.is_symlink():
                    skip(SCAN_BROKEN_LINK, rel)
                else:  # fifo, socket, device with an image name
                    skip(SCAN_NOT_A_FILE, rel)
            except OSError as err:
                skip(_scan_cause(err, folder=False), rel)
        # reversed: the stacks pop the first name first
        for rel, path in reversed(subfolders):
            try:
                enter(rel, path, ancestors)
            except OSError as err:
                skip(_scan_cause(err, folder=False), rel)
        linked.extend(reversed(links))
    return files, skipped


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


__all__ = ['IMG_EXTENSIONS', 'UnlabeledImageDataset']
