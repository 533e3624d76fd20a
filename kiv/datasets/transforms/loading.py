"""Image loading that always yields an 8-bit, 3-channel BGR array.

Distillation folders are scraped collections: grayscale scans, RGBA and
palette PNGs, 16-bit TIFFs and a few broken files. Teachers and the student
expect ``uint8`` BGR (the OpenMMLab convention), so decoding normalises every
readable image to that, and turns every unreadable file into one typed error
that :class:`~kiv.datasets.UnlabeledImageDataset` catches to skip the sample.
Images whose header declares more pixels than a cap (decompression bombs: a
100 KB PNG can declare 30000x30000 pixels, 2.7 GB once decoded) are refused
from the header, before any pixel is decoded.
"""
from __future__ import annotations

import errno
import io
import re
import warnings
from typing import Optional

import cv2
import mmcv
import mmengine.fileio as fileio
import numpy as np
from mmcv.image.io import supported_backends
from mmcv.transforms import LoadImageFromFile
from PIL import Image

from kiv.registry import TRANSFORMS

#: ``color_type`` values whose decoded arrays :func:`to_bgr_uint8` handles.
COLOR_TYPES = ('color', 'color_ignore_orientation', 'unchanged')

#: default pixel cap of :class:`LoadImageFromFileSafe`: Pillow's own
#: default ``PIL.Image.MAX_IMAGE_PIXELS`` (1 GiB / 4 / 3 = 89,478,485 pixels,
#: e.g. 9459 x 9459), the size above which Pillow warns of a decompression
#: bomb.
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)

#: causes of an :class:`UnreadableImageError` (``cause`` attribute)
CAUSE_MISSING = 'missing file'
CAUSE_PERMISSION = 'permission denied'
CAUSE_NOT_A_FILE = 'not a regular file'
CAUSE_EMPTY = 'empty file'
CAUSE_TOO_LARGE = 'too many pixels'
CAUSE_UNDECODABLE = 'not decodable'
CAUSE_PIXEL_TYPE = 'unsupported pixel type'
CAUSE_READ_ERROR = 'read error'
CAUSE_SYMLINK_LOOP = 'symlink loop'


class UnreadableImageError(OSError):
    """An image file could not be read or decoded.

    Args:
        path (str): the file.
        reason (str): what went wrong (the decoder's message).
        cause (str): the kind of failure, one short phrase (``'missing
            file'``, ``'too many pixels'``, ``'not decodable'`` ...; the
            ``CAUSE_*`` constants of this module). Defaults to ``'not
            decodable'``.
    """

    def __init__(self, path: str, reason: str,
                 cause: str = CAUSE_UNDECODABLE) -> None:
        super().__init__(f'cannot load image {path!r}: {reason}')
        self.path = path
        self.reason = reason
        self.cause = cause

    def __reduce__(self):
        # keep the constructor picklable (worker processes)
        return type(self), (self.path, self.reason, self.cause)


class ImageTooLargeError(ValueError):
    """An image header declares more pixels than the loader's cap."""


class _NotDecodable(ValueError):
    """The decoder returned nothing."""


def _cause_of(err: BaseException) -> str:
    """The ``CAUSE_*`` phrase for an error raised while loading a file."""
    if isinstance(err, ImageTooLargeError):
        return CAUSE_TOO_LARGE
    if isinstance(err, FileNotFoundError):
        return CAUSE_MISSING
    if isinstance(err, PermissionError):
        return CAUSE_PERMISSION
    if isinstance(err, (IsADirectoryError, NotADirectoryError)):
        return CAUSE_NOT_A_FILE
    if isinstance(err, OSError) and err.errno is not None:
        return (CAUSE_SYMLINK_LOOP if err.errno == errno.ELOOP else
                CAUSE_READ_ERROR)
    return CAUSE_UNDECODABLE


_PIL_PIXELS = re.compile(r'\((\d+) pixels\)')


def header_pixels(img_bytes: bytes) -> tuple[Optional[int], str]:
    """Number of pixels an encoded image declares, without decoding it.

    Reads the header with Pillow (``Image.open`` parses the header only;
    pixel data is decoded lazily and never here).

    Args:
        img_bytes (bytes): the encoded file.

    Returns:
        tuple[int | None, str]: the pixel count and a description
        (``'30000x30000'``), or ``(None, '')`` when Pillow cannot parse the
        header (a format it does not know, or a broken file: the decoder
        then decides). For images beyond Pillow's own hard limit (twice
        ``PIL.Image.MAX_IMAGE_PIXELS``), which it refuses to open, the count
        comes from Pillow's message (at least that limit).
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(img_bytes)) as img:
                width, height = img.size
        except Image.DecompressionBombError as err:
            found = _PIL_PIXELS.search(str(err))
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
            pixels = int(found.group(1)) if found else limit
            return pixels, f'{pixels} pixels'
        except Exception:  # unknown format or broken header
            return None, ''
    return max(1, width) * max(1, height), f'{width}x{height}'


def to_bgr_uint8(img: np.ndarray) -> np.ndarray:
    """Convert a decoded image to 8-bit, 3-channel BGR.

    ``uint16`` samples are scaled to the full 8-bit range (``v >> 8``, exact
    for 8-bit data stored as 16-bit), ``bool`` (1-bit) maps to {0, 255}.
    Gray ``(H, W)`` / ``(H, W, 1)`` and gray + alpha ``(H, W, 2)`` are
    replicated to 3 channels; the alpha channel of ``(H, W, 4)`` BGRA is
    dropped (as ``PIL.Image.convert('RGB')`` does in timm/torchvision
    loaders, so students see what the teachers were trained on).

    Args:
        img (np.ndarray): ``(H, W)`` or ``(H, W, C)`` with C in {1, 2, 3, 4},
            channels in BGR(A) order, dtype ``uint8``, ``uint16`` or ``bool``.

    Returns:
        np.ndarray: ``(H, W, 3)`` ``uint8`` BGR. The input itself when it is
        already in that form.

    Raises:
        ValueError: for other dtypes or shapes.
    """
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * np.uint8(255)
    elif img.dtype != np.uint8:
        raise ValueError(f'unsupported pixel type {img.dtype} '
                         '(expected uint8, uint16 or bool)')
    if img.ndim == 3 and img.shape[2] in (1, 2):
        img = np.ascontiguousarray(img[..., 0])  # gray (+ alpha)
    if img.ndim == 2:
        return mmcv.gray2bgr(img)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    raise ValueError(f'unsupported image shape {img.shape} '
                     '(expected (H, W) or (H, W, C) with C <= 4)')


@TRANSFORMS.register_module()
class LoadImageFromFileSafe(LoadImageFromFile):
    """Load any image file as ``uint8`` ``(H, W, 3)`` BGR, or fail typed.

    A drop-in replacement for mmcv's ``LoadImageFromFile`` (same keys, file
    backends and decoders through :func:`mmcv.imfrombytes`) with two
    guarantees:

    - every readable image comes out as 8-bit, 3-channel BGR: grayscale,
      1-bit, gray + alpha, RGBA, palette and 16-bit images are converted
      (see :func:`to_bgr_uint8`);
    - every unreadable file (missing, no read permission, zero bytes,
      truncated, not an image, unsupported pixel type, more pixels than
      ``max_pixels``) raises :class:`UnreadableImageError` naming the file
      and its ``cause``, which :class:`~kiv.datasets.UnlabeledImageDataset`
      catches to skip the sample. Other pipeline errors (bugs) still
      propagate.

    Decompression bombs: before decoding, the pixel count the header
    declares is read with Pillow (:func:`header_pixels`, no pixel is
    decoded) and a file above ``max_pixels`` is refused (cause ``'too many
    pixels'``). Files whose header Pillow cannot parse go to the decoder
    unchecked (OpenCV has its own cap, ``CV_IO_MAX_IMAGE_PIXELS``, 2^30 by
    default). With ``imdecode_backend='pillow'`` Pillow also refuses images
    above twice ``PIL.Image.MAX_IMAGE_PIXELS`` whatever ``max_pixels`` says.

    With the default ``cv2`` backend and ``color_type='color'`` OpenCV does
    the conversion itself (EXIF orientation applied, 16-bit scaled);
    ``'unchanged'`` decodes the stored samples and channels (no EXIF
    rotation) and converts them here. With ``imdecode_backend='pillow'``,
    Pillow clips 16-bit samples to 255 in ``'color'`` mode and returns
    palette indices in ``'unchanged'`` mode: keep ``cv2`` for such data.

    Required Keys:

    - img_path

    Modified Keys:

    - img (``uint8`` ``(H, W, 3)`` BGR)
    - img_shape
    - ori_shape

    Args:
        color_type (str): flag for :func:`mmcv.imfrombytes`, one of
            ``'color'``, ``'color_ignore_orientation'``, ``'unchanged'``.
            Defaults to ``'color'``.
        imdecode_backend (str): decoder, one of mmcv's backends
            (``'cv2'``, ``'pillow'``, ``'turbojpeg'``, ``'tifffile'``).
            Defaults to ``'cv2'``.
        ignore_empty (bool): return ``None`` instead of raising for an
            unreadable file (mmcv's semantics). Defaults to False.
        max_pixels (int, optional): refuse images whose header declares more
            pixels (width x height) than this; None disables the check.
            Defaults to :data:`DEFAULT_MAX_PIXELS` (89,478,485, Pillow's
            default ``MAX_IMAGE_PIXELS``).
        backend_args (dict, optional): file backend arguments, see
            :func:`mmengine.fileio.get`. Defaults to None (local files).
    """

    def __init__(self,
                 color_type: str = 'color',
                 imdecode_backend: str = 'cv2',
                 ignore_empty: bool = False,
                 *,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 backend_args: Optional[dict] = None) -> None:
        if color_type not in COLOR_TYPES:
            raise ValueError(f'LoadImageFromFileSafe: color_type must be one '
                             f'of {COLOR_TYPES}, got {color_type!r}')
        if imdecode_backend not in supported_backends:
            raise ValueError(f'LoadImageFromFileSafe: imdecode_backend must '
                             f'be one of {supported_backends}, got '
                             f'{imdecode_backend!r}')
        if max_pixels is not None and (not isinstance(max_pixels, int)
                                       or isinstance(max_pixels, bool)
                                       or max_pixels <= 0):
            raise ValueError('LoadImageFromFileSafe: max_pixels must be a '
                             f'positive int or None, got {max_pixels!r}')
        self.max_pixels = max_pixels
        super().__init__(to_float32=False,
                         color_type=color_type,
                         imdecode_backend=imdecode_backend,
                         ignore_empty=ignore_empty,
                         backend_args=backend_args)

    def transform(self, results: dict) -> Optional[dict]:
        """Read, decode and normalise ``results['img_path']``.

        Args:
            results (dict): needs ``img_path``.

        Returns:
            dict | None: ``results`` with ``img`` ``(H, W, 3)`` ``uint8``,
            ``img_shape`` and ``ori_shape`` ``(H, W)``; ``None`` for an
            unreadable file when ``ignore_empty=True``.

        Raises:
            UnreadableImageError: the file cannot be read or decoded.
        """
        filename = results['img_path']
        try:
            img_bytes = fileio.get(filename, backend_args=self.backend_args)
            if not img_bytes:
                raise UnreadableImageError(filename, 'the file is empty',
                                           CAUSE_EMPTY)
            if self.max_pixels is not None:
                self._check_pixels(img_bytes)
            img = mmcv.imfrombytes(img_bytes,
                                   flag=self.color_type,
                                   backend=self.imdecode_backend)
            if img is None:
                raise _NotDecodable('not a decodable image')
            try:
                img = to_bgr_uint8(img)
            except ValueError as err:
                raise UnreadableImageError(filename, str(err),
                                           CAUSE_PIXEL_TYPE) from err
        except UnreadableImageError:
            if self.ignore_empty:
                return None
            raise
        # Decoders signal broken data with many types (OSError, cv2.error,
        # ValueError, PIL's DecompressionBombError ...): any failure while
        # reading/decoding this one file makes the file unreadable.
        except Exception as err:
            if self.ignore_empty:
                return None
            reason = f'{type(err).__name__}: {err}'.strip()
            raise UnreadableImageError(filename, reason,
                                       _cause_of(err)) from err
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results

    def _check_pixels(self, img_bytes: bytes) -> None:
        """Refuse an image whose header declares more than ``max_pixels``.

        Raises:
            ImageTooLargeError: the header declares too many pixels.
        """
        pixels, size = header_pixels(img_bytes)
        if pixels is not None and pixels > self.max_pixels:
            raise ImageTooLargeError(
                f'the header declares {size} = {pixels} pixels, more than '
                f'max_pixels={self.max_pixels} (a decompression bomb?); '
                'refused before decoding')

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}('
                f"color_type='{self.color_type}', "
                f"imdecode_backend='{self.imdecode_backend}', "
                f'ignore_empty={self.ignore_empty}, '
                f'max_pixels={self.max_pixels}, '
                f'backend_args={self.backend_args})')
