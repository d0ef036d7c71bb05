"""Loading labelled image datasets (MNIST, Fashion-MNIST, CIFAR-10/100, npz, class folders) with a cache."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ntkdd.common.data_formats import (  # noqa: F401 (re-exported: the public names live here)
    CIFAR10_CLASSES, CIFAR10_JPG_DIR, CIFAR10_JPG_TARBALL, CIFAR10_PY_DIR, CIFAR10_TARBALL, CIFAR100_PY_DIR,
    CIFAR100_TARBALL, FASHION_MNIST_CLASSES, IDX_FILES, IMAGE_SUFFIXES, MNIST_CLASSES, DataError, _MissingFiles,
    _RawSplits, _Source, _class_folder_source, _class_order, _pillow, _standard_source)

log = logging.getLogger(__name__)


STANDARD_DATASETS = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100')

DOWNLOAD_BASE_URLS = {
    'mnist': 'https://storage.googleapis.com/cvdf-datasets/mnist/',
    'fashion_mnist': 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
    'cifar10': 'https://www.cs.toronto.edu/~kriz/',
    'cifar100': 'https://www.cs.toronto.edu/~kriz/',
}
# Digests of the official releases, as (algorithm, hex digest). The publishers give MD5s only.
DOWNLOAD_CHECKSUMS: dict[str, dict[str, tuple[str, str]]] = {
    'mnist': {
        'train-images-idx3-ubyte.gz': ('md5', 'f68b3c2dcbeaaa9fbdd348bbdeb94873'),
        'train-labels-idx1-ubyte.gz': ('md5', 'd53e105ee54ea40749a09fcbcd1e9432'),
        't10k-images-idx3-ubyte.gz': ('md5', '9fb629c4189551a2d022fa330f9573f3'),
        't10k-labels-idx1-ubyte.gz': ('md5', 'ec29112dd5afa0611ce80d1b7f02629c'),
    },
    'fashion_mnist': {
        'train-images-idx3-ubyte.gz': ('md5', '8d4fb7e6c68d591d4c3dfef9ec88bf0d'),
        'train-labels-idx1-ubyte.gz': ('md5', '25c81989df183df01b3e8a0aad5dffbe'),
        't10k-images-idx3-ubyte.gz': ('md5', 'bef4ecab320f06d8554ea6380940ec79'),
        't10k-labels-idx1-ubyte.gz': ('md5', 'bb300cfdad3c16e7a12a480ee83cd310'),
    },
    'cifar10': {CIFAR10_TARBALL: ('md5', 'c58f30108f718f92721af3b95e74349a')},
    'cifar100': {CIFAR100_TARBALL: ('md5', 'eb9058c3a382ffc7106e4002c42a8d85')},
}
# A mirror of the official files (same names, same digests) to download from instead.
DOWNLOAD_URL_ENV = 'NTKDD_DOWNLOAD_URL'
# Where download_dataset puts each dataset's files, relative to data_dir.
DOWNLOAD_SUBDIRS = {'mnist': 'mnist', 'fashion_mnist': 'fashion_mnist', 'cifar10': '', 'cifar100': ''}

CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset: float32 NHWC images in [0, 1] and int32 labels (read-only arrays)."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        for split, x, y in (('train', self.x_train, self.y_train), ('test', self.x_test, self.y_test)):
            if x.dtype != np.float32 or x.ndim != 4:
                raise DataError(f'{self.name}: x_{split} must be float32 NHWC, got {x.dtype} {x.shape}')
            if y.dtype != np.int32 or y.shape != (x.shape[0],):
                raise DataError(f'{self.name}: y_{split} must be int32 of shape ({x.shape[0]},), '
                                f'got {y.dtype} {y.shape}')
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f'{self.name}: train images {self.x_train.shape[1:]} and test images '
                            f'{self.x_test.shape[1:]} differ in shape')
        object.__setattr__(self, 'class_names', tuple(str(c) for c in self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def checksum(self) -> str:
        """sha256 hex over the four arrays (shape, dtype and bytes) and the class names; not the name."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            # Little-endian, C order: the same bytes on every machine.
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder('<'))
            digest.update(f'{array.dtype.str}{array.shape}'.encode())
            digest.update(memoryview(array).cast('B'))
        digest.update('\n'.join(self.class_names).encode())
        return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Public entry points.


def load_dataset(name: str, data_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 download: bool = False) -> Dataset:
    """Loads `name` (a standard dataset, an .npz path or a class-folder path) from `data_dir`.

    Standard datasets and class folders are decoded once and cached as uint8 in an .npz under
    `cache_dir` (default $NTKDD_CACHE, else ~/.cache/ntkdd/; never the data folder).
    With `download=True`, missing standard files are fetched first (see `download_dataset`).
    """
    data_dir = Path(data_dir)
    path = _as_dataset_path(name, data_dir)
    if path is not None and path.suffix == '.npz' and path.is_file():
        return _load_npz(path)
    if path is not None and path.is_dir():
        source = _class_folder_source(path)
        display_name = path.name
    elif name in STANDARD_DATASETS:
        try:
            source = _standard_source(name, data_dir)
        except _MissingFiles as missing:
            if not download:
                raise DataError(f'{missing} Run with --download (download=True) to fetch them '
                                f'when online, or download them by hand from {_where_to_get(name)} into '
                                f'{data_dir / DOWNLOAD_SUBDIRS[name]}.') from None
            download_dataset(name, data_dir)
            source = _standard_source(name, data_dir)
        display_name = name
    else:
        raise DataError(
            f'Unknown dataset {name!r}: use one of {", ".join(STANDARD_DATASETS)}, a path to an .npz '
            'with keys x_train, y_train, x_test, y_test (optional class_names), or a path to a folder '
            'with train/ and test/, each holding one sub-folder of PNG/JPEG images per class.')
    return _cached_decode(source, _resolve_cache_dir(cache_dir, data_dir),
                          lambda raw: _to_dataset(display_name, raw, source.cache_name))


def download_dataset(name: str, data_dir: str | os.PathLike, *, base_url: str | None = None,
                     checksums: Mapping[str, tuple[str, str]] | None = None) -> list[Path]:
    """Fetches the official files of a standard dataset into data_dir and verifies their digests.

    `base_url` replaces the official location (the file names are appended to it); without it,
    $NTKDD_DOWNLOAD_URL (a mirror holding the same files) does, else the official location.
    `checksums` maps file name -> (hash algorithm, hex digest) and replaces the official
    digests (a mirror's files are checked against the official ones). Files already present
    are kept. A file whose digest differs is left at `<file>.rejected`, never at its real name,
    and a DataError names both digests. When the location cannot be reached (offline), one
    DataError names every missing file and the folder to put them in. Returns the paths of the
    dataset's files.
    """
    if name not in DOWNLOAD_CHECKSUMS:
        raise DataError(f'No download for {name!r}: downloadable datasets are {", ".join(DOWNLOAD_CHECKSUMS)}.')
    expected = dict(DOWNLOAD_CHECKSUMS[name] if checksums is None else checksums)
    base_url = base_url or os.environ.get(DOWNLOAD_URL_ENV) or DOWNLOAD_BASE_URLS[name]
    target_dir = Path(data_dir) / DOWNLOAD_SUBDIRS[name]
    target_dir.mkdir(parents=True, exist_ok=True)
    paths = [target_dir / file_name for file_name in DOWNLOAD_CHECKSUMS[name]]
    for target in paths:
        if target.exists():
            log.info('download %s: %s already present, kept', name, target)
            continue
        url = base_url.rstrip('/') + '/' + target.name
        if target.name not in expected:
            raise DataError(f'No checksum given for {target.name}: add it to `checksums`.')
        try:
            _download_verified(url, target, *expected[target.name])
        except _Unreachable as error:
            missing = [p.name for p in paths if not p.exists()]
            raise DataError(
                f'{name}: could not download {url} ({error.reason}). Fetch {", ".join(missing)} '
                f'(from {base_url}, or a mirror of them) and put them in {target_dir}, then run '
                f'again; or point ${DOWNLOAD_URL_ENV} (make demo DOWNLOAD_URL=...) at a mirror '
                f'that serves them.') from None
    return paths


# --------------------------------------------------------------------------------------------
# Dataset names, sources and the cache.


def _as_dataset_path(name: str, data_dir: Path) -> Path | None:
    """The path `name` denotes (as given, else relative to data_dir), or None if it names no file."""
    if name in STANDARD_DATASETS:
        return None
    for candidate in (Path(name).expanduser(), data_dir / name):
        if candidate.exists():
            return candidate
    if name.endswith('.npz'):
        raise DataError(f'npz dataset {name!r} not found (looked at {Path(name).resolve()} and '
                        f'{(data_dir / name).resolve()}): check the path.')
    return None


def _where_to_get(name: str) -> str:
    if name in ('mnist', 'fashion_mnist'):
        return DOWNLOAD_BASE_URLS[name]
    return DOWNLOAD_BASE_URLS[name] + next(iter(DOWNLOAD_CHECKSUMS[name]))


def _resolve_cache_dir(cache_dir: str | os.PathLike | None, data_dir: Path) -> Path | None:
    """The cache folder: the one given, else $NTKDD_CACHE, else $XDG_CACHE_HOME/ntkdd (~/.cache/ntkdd).

    Never the data folder itself: it is often a shared, read-only copy of the dataset.
    """
    default = os.environ.get('NTKDD_CACHE') or (
        Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'ntkdd')
    candidates = [Path(cache_dir)] if cache_dir is not None else [Path(default)]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    log.warning('no writable cache folder among %s: decoding without a cache', candidates)
    return None


def _cache_key(source: _Source) -> str:
    digest = hashlib.sha256(f'v{CACHE_FORMAT_VERSION}\n{source.cache_name}\n'.encode())
    for path in source.files:
        stat = path.stat()
        digest.update(f'{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:20]


def _source_id(source: _Source) -> str:
    """Which files a cache entry was decoded from (their paths, not their state): entries of two
    copies of one dataset in different folders coexist."""
    digest = hashlib.sha256('\n'.join(str(path.resolve()) for path in source.files).encode())
    return digest.hexdigest()[:8]


def _cached_decode(source: _Source, cache_dir: Path | None,
                   build: Callable[[_RawSplits], Dataset]) -> Dataset:
    """The source's dataset (`build` of its decoded arrays), read from the cache, or decoded,
    validated by `build` and then cached.

    Entries are keyed by source (the files' paths) and state (their sizes and mtimes): an entry
    of another folder's copy is never touched, and a source that fails validation writes and
    removes nothing, so a good entry is never replaced by a bad one.
    """
    if cache_dir is None:
        return build(source.decode())
    stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source.cache_name)}-{_source_id(source)}"
    cache_file = cache_dir / f'{stem}-{_cache_key(source)}.npz'
    if cache_file.exists():
        try:
            with np.load(cache_file, allow_pickle=False) as cached:
                raw = _RawSplits(cached['x_train'], cached['y_train'], cached['x_test'], cached['y_test'],
                                 tuple(str(c) for c in cached['class_names']))
            log.info('%s: read from cache %s', source.cache_name, cache_file)
            return build(raw)
        except (OSError, KeyError, ValueError) as error:
            log.warning('%s: unreadable cache %s (%s): decoding again', source.cache_name, cache_file, error)
    raw = source.decode()
    dataset = build(raw)   # raises on data that fail validation: then the cache stays as it was
    # Entries of this same source under older states (sizes, mtimes) are stale now.
    for stale in cache_dir.glob(f'{stem}-*.npz'):
        if stale != cache_file and re.fullmatch(re.escape(stem) + r'-[0-9a-f]{20}\.npz', stale.name):
            stale.unlink(missing_ok=True)
    _write_npz_atomically(cache_file, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test,
                          y_test=raw.y_test, class_names=np.array(raw.class_names, dtype=str))
    log.info('%s: cached at %s', source.cache_name, cache_file)
    return dataset


def _write_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    """Writes an uncompressed npz next to `path`, then renames it: readers never see half a file."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + '.', suffix='.tmp', delete=False)
    try:
        with handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)
    except OSError as error:
        Path(handle.name).unlink(missing_ok=True)
        log.warning('could not write cache %s: %s', path, error)


def _to_dataset(name: str, raw: _RawSplits, source: str) -> Dataset:
    splits = {}
    for split, x, y in (('train', raw.x_train, raw.y_train), ('test', raw.x_test, raw.y_test)):
        x = _images_nhwc(x, split, source)
        _check_labels(y, x.shape[0], len(raw.class_names), split, source)
        x, y = _to_unit_float(x, split, source), y.astype(np.int32)
        # The loader's arrays are fresh: freeze them so nothing changes them behind checksum()'s back.
        x.setflags(write=False)
        y.setflags(write=False)
        splits[split] = (x, y)
    return Dataset(name, *splits['train'], *splits['test'], class_names=tuple(raw.class_names))


# --------------------------------------------------------------------------------------------
# Validation shared by all formats.


def _images_nhwc(x: np.ndarray, split: str, source: str) -> np.ndarray:
    """Checks that x holds images (numeric, NHW or NHWC) and returns it as NHWC."""
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f'{source}: x_{split} has dtype {x.dtype}, not image pixels: store images as '
                        'uint8 in 0..255 or floats in [0, 1].')
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f'{source}: x_{split} has shape {x.shape}: images must be NHW (grayscale) or '
                        'NHWC; reshape flattened rows to (N, H, W[, C]).')
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DataError(f'{source}: x_{split} is empty (shape {x.shape}): every split needs images.')
    if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3):
        raise DataError(f'{source}: x_{split} has shape {x.shape}, which looks channels-first (NCHW): '
                        'transpose it to NHWC with x.transpose(0, 2, 3, 1).')
    return x


def _to_unit_float(x: np.ndarray, split: str, source: str) -> np.ndarray:
    """Pixels as float32 in [0, 1]: uint8 (or integers in 0..255) are divided by 255."""
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise DataError(f'{source}: x_{split} has NaN or inf pixels: replace or drop those images.')
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f'{source}: float x_{split} spans [{low:g}, {high:g}], not [0, 1]: store '
                            'uint8 in 0..255 or divide by 255.')
        return x.astype(np.float32)
    if x.dtype != np.uint8:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise DataError(f'{source}: integer x_{split} spans [{low}, {high}], not 0..255: store '
                            'uint8 pixels or floats in [0, 1].')
    pixels = x.astype(np.float32)
    pixels /= np.float32(255)  # in place: one 4-byte pass, not a uint8->float32 casting divide
    return pixels


def _check_labels(y: np.ndarray, num_images: int, num_classes: int | None, split: str, source: str) -> None:
    """Integer class ids, one per image, in 0..num_classes-1 (num_classes None: any id >= 0)."""
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) and y.dtype != bool):
        raise DataError(f'{source}: y_{split} must be a 1-D array of integer class ids, got {y.dtype} '
                        f'{y.shape}: convert one-hot labels with argmax(axis=1).')
    if y.shape[0] != num_images:
        raise DataError(f'{source}: {num_images} {split} images but {y.shape[0]} {split} labels: '
                        'each image needs exactly one label.')
    if y.size and y.min() < 0:
        raise DataError(f'{source}: y_{split} holds negative class ids (smallest {y.min()}), outside '
                        '0..(number of classes - 1): relabel those images or drop them.')
    if y.size and num_classes is not None and y.max() >= num_classes:
        raise DataError(f'{source}: y_{split} spans [{y.min()}, {y.max()}], outside 0..{num_classes - 1} '
                        f'for {num_classes} classes: fix the labels or the class names.')


# --------------------------------------------------------------------------------------------
# .npz files.


def _load_npz(path: Path) -> Dataset:
    source = str(path)
    with open(path, 'rb') as f:
        head = f.read(6)
    if not head.startswith(b'PK'):
        kind = 'a .npy file (one array)' if head.startswith(b'\x93NUMPY') else 'not an .npz archive'
        raise DataError(f'{source} is {kind}: an npz dataset is written with numpy.savez(path, x_train=..., '
                        'y_train=..., x_test=..., y_test=...).')
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in archive.files]
            if missing:
                raise DataError(f'{source}: missing keys {missing} (has {archive.files}): an npz dataset needs '
                                'x_train, y_train, x_test, y_test and optionally class_names.')
            arrays = {k: archive[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')}
            names = archive['class_names'] if 'class_names' in archive.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f'{source}: unreadable npz ({error}): save it with numpy.savez and without '
                        'object arrays.') from None
    for split in ('train', 'test'):
        labels = arrays[f'y_{split}']
        _check_labels(labels, len(labels), None, split, source)
    if names is not None:
        class_names = tuple(str(n) for n in np.asarray(names).ravel())
    else:
        class_names = tuple(str(c) for c in range(int(max(arrays['y_train'].max(initial=-1),
                                                          arrays['y_test'].max(initial=-1))) + 1))
    raw = _RawSplits(arrays['x_train'], arrays['y_train'], arrays['x_test'], arrays['y_test'], class_names)
    return _to_dataset(path.stem, raw, source)


# --------------------------------------------------------------------------------------------
# Downloads.


class _Unreachable(Exception):
    """A download failed for want of a connection or a file at the URL; download_dataset says what to do."""

    def __init__(self, reason):
        super().__init__(str(reason))
        self.reason = reason


def _download_verified(url: str, target: Path, algorithm: str, expected: str) -> None:
    """Streams url into a temp file beside target, hashing; renames it into place only if the digest matches."""
    log.info('downloading %s -> %s', url, target)
    digest = hashlib.new(algorithm)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name + '.', suffix='.part', delete=False)
    try:
        with handle, urllib.request.urlopen(url, timeout=60) as response:
            while block := response.read(1 << 20):
                digest.update(block)
                handle.write(block)
    except (urllib.error.URLError, OSError) as error:
        Path(handle.name).unlink(missing_ok=True)
        raise _Unreachable(getattr(error, 'reason', None) or error) from None
    got = digest.hexdigest()
    if got != expected.lower():
        rejected = target.with_name(target.name + '.rejected')
        os.replace(handle.name, rejected)
        raise DataError(f'{url}: {algorithm} digest mismatch: expected {expected}, got {got}. The download was '
                        f'kept at {rejected}, not at {target}; retry, or fetch the file from the official '
                        'source by hand.')
    os.replace(handle.name, target)
