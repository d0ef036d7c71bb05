"""Loading labelled image datasets (MNIST, Fashion-MNIST, CIFAR-10/100, npz, class folders) with a cache."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import re
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

STANDARD_DATASETS = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100')

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck')
MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# The four idx files of MNIST and Fashion-MNIST, in the order (train images, train labels,
# test images, test labels).
IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
             't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
CIFAR10_TARBALL = 'cifar-10-python.tar.gz'
CIFAR10_PY_DIR = 'cifar-10-batches-py'
CIFAR10_JPG_TARBALL = 'cifar10-jpg.tar.gz'
CIFAR10_JPG_DIR = 'cifar10'
CIFAR100_TARBALL = 'cifar-100-python.tar.gz'
CIFAR100_PY_DIR = 'cifar-100-python'

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

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
CACHE_FORMAT_VERSION = 1
_IDX_UBYTE = 0x08


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says how to fix it."""


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


class _RawSplits(NamedTuple):
    """Decoded uint8 NHWC images and integer labels: what the cache stores."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


class _Source(NamedTuple):
    """How to decode one dataset, and which files it reads (their sizes+mtimes key the cache)."""
    cache_name: str
    files: tuple[Path, ...]
    decode: Callable[[], _RawSplits]


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


class _MissingFiles(Exception):
    """Raised inside the loader when a standard dataset's files are absent; load_dataset adds the fix."""


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


def _standard_source(name: str, data_dir: Path) -> _Source:
    if name in ('mnist', 'fashion_mnist'):
        return _idx_source(name, data_dir)
    if name == 'cifar10':
        return _cifar10_source(data_dir)
    return _cifar100_source(data_dir)


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
# MNIST and Fashion-MNIST: idx files.


def _idx_source(name: str, data_dir: Path) -> _Source:
    sub_dirs = ('mnist',) if name == 'mnist' else ('fashion_mnist', 'fashion-mnist')
    search = [data_dir / sub for sub in sub_dirs] + [data_dir]
    for folder in search:
        found = [_first_existing(folder / (base + '.gz'), folder / base) for base in IDX_FILES]
        if all(found):
            files = tuple(found)
            classes = MNIST_CLASSES if name == 'mnist' else FASHION_MNIST_CLASSES
            return _Source(name, files, lambda: _decode_idx_set(files, classes))
    wanted = ', '.join(base + '.gz' for base in IDX_FILES)
    raise _MissingFiles(f'{name}: looked for {wanted} (or the same without .gz) in '
                        f'{", ".join(str(f) for f in search)} and found not all four.')


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _decode_idx_set(files: Sequence[Path], class_names: tuple[str, ...]) -> _RawSplits:
    x_train, y_train, x_test, y_test = (_read_idx(f) for f in files)
    for split, x, y, xf, yf in (('train', x_train, y_train, files[0], files[1]),
                                ('test', x_test, y_test, files[2], files[3])):
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f'{xf.name} / {yf.name}: expected 3-D images and 1-D labels, got shapes '
                            f'{x.shape} and {y.shape}: the files may be swapped; re-download them.')
    return _RawSplits(x_train[..., None], y_train.astype(np.int32), x_test[..., None],
                      y_test.astype(np.int32), class_names)


def _read_idx(path: Path) -> np.ndarray:
    """Parses an idx file (optionally gzip'd): magic 0x0000 08 ndim, ndim big-endian sizes, ubytes."""
    try:
        opener = gzip.open if path.suffix == '.gz' else open
        with opener(path, 'rb') as f:
            content = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f'{path}: cannot read ({error}): the file is corrupt or truncated; re-download it.') from None
    if len(content) < 4 or content[:2] != b'\0\0' or content[2] != _IDX_UBYTE or not 1 <= content[3] <= 4:
        raise DataError(f'{path}: wrong idx magic number {content[:4].hex()} (expected 000008 followed by '
                        'the number of dimensions): not an unsigned-byte idx file; re-download it.')
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f'{path}: truncated idx header: re-download the file.')
    shape = struct.unpack(f'>{ndim}I', content[4:header])
    expected = int(np.prod(shape))
    if len(content) - header != expected:
        raise DataError(f'{path}: idx header announces shape {shape} ({expected} bytes) but the file holds '
                        f'{len(content) - header}: truncated or corrupt; re-download it.')
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


# --------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100: python pickles (tarball or extracted), or the JPEG copy of CIFAR-10.


def _cifar10_source(data_dir: Path) -> _Source:
    batch_names = [f'data_batch_{i}' for i in range(1, 6)]
    py_dir = data_dir / CIFAR10_PY_DIR
    py_files = [py_dir / n for n in batch_names + ['test_batch', 'batches.meta']]
    if all(p.is_file() for p in py_files):
        return _Source('cifar10', tuple(py_files),
                       lambda: _decode_cifar_pickles(_read_from_dir(py_dir), batch_names, ['test_batch'],
                                                     'batches.meta', b'labels', b'label_names', str(py_dir)))
    tarball = data_dir / CIFAR10_TARBALL
    if tarball.is_file():
        return _Source('cifar10', (tarball,),
                       lambda: _decode_cifar_pickles(_read_from_tar(tarball, CIFAR10_PY_DIR), batch_names,
                                                     ['test_batch'], 'batches.meta', b'labels',
                                                     b'label_names', str(tarball)))
    jpg_tarball = data_dir / CIFAR10_JPG_TARBALL
    if jpg_tarball.is_file():
        return _Source('cifar10-jpg', (jpg_tarball,),
                       lambda: _decode_class_tree(_class_tree_from_tar(jpg_tarball, CIFAR10_JPG_DIR),
                                                  str(jpg_tarball)))
    jpg_dir = data_dir / CIFAR10_JPG_DIR
    if (jpg_dir / 'train').is_dir() and (jpg_dir / 'test').is_dir():
        return _class_folder_source(jpg_dir, cache_name='cifar10-jpg-dir')
    raise _MissingFiles(
        f'cifar10: looked in {data_dir} for {CIFAR10_TARBALL}, {CIFAR10_PY_DIR}/ (data_batch_1..5, '
        f'test_batch, batches.meta), {CIFAR10_JPG_TARBALL} and {CIFAR10_JPG_DIR}/{{train,test}}/ and '
        'found none of them.')


def _cifar100_source(data_dir: Path) -> _Source:
    py_dir = data_dir / CIFAR100_PY_DIR
    py_files = [py_dir / n for n in ('train', 'test', 'meta')]
    if all(p.is_file() for p in py_files):
        return _Source('cifar100', tuple(py_files),
                       lambda: _decode_cifar_pickles(_read_from_dir(py_dir), ['train'], ['test'], 'meta',
                                                     b'fine_labels', b'fine_label_names', str(py_dir)))
    tarball = data_dir / CIFAR100_TARBALL
    if tarball.is_file():
        return _Source('cifar100', (tarball,),
                       lambda: _decode_cifar_pickles(_read_from_tar(tarball, CIFAR100_PY_DIR), ['train'],
                                                     ['test'], 'meta', b'fine_labels', b'fine_label_names',
                                                     str(tarball)))
    raise _MissingFiles(f'cifar100: looked in {data_dir} for {CIFAR100_TARBALL} and {CIFAR100_PY_DIR}/ '
                        '(train, test, meta) and found neither.')


def _read_from_dir(folder: Path) -> Callable[[str], bytes]:
    return lambda name: (folder / name).read_bytes()


def _read_from_tar(tarball: Path, folder: str) -> Callable[[str], bytes]:
    """Reads all members under `folder/` once (the tarball is gzip'd: no cheap random access)."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 2 and parts[0] == folder:
                    members[parts[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f'{tarball}: unreadable tarball ({error}): re-download it.') from None

    def read(name: str) -> bytes:
        if name not in members:
            raise DataError(f'{tarball}: no member {folder}/{name}: the tarball is incomplete; re-download it.')
        return members[name]
    return read


def _unpickle(content: bytes, name: str, source: str) -> dict:
    # The official CIFAR files are Python 2 pickles: bytes keys. Only load files you trust.
    try:
        return pickle.loads(content, encoding='bytes')
    except Exception as error:  # pickle raises many kinds on garbage input.
        raise DataError(f'{source}: {name} is not a readable CIFAR pickle ({error}): re-download it.') from None


def _decode_cifar_pickles(read: Callable[[str], bytes], train_names: Sequence[str], test_names: Sequence[str],
                          meta_name: str, label_key: bytes, names_key: bytes, source: str) -> _RawSplits:
    meta = _unpickle(read(meta_name), meta_name, source)
    if names_key not in meta:
        raise DataError(f'{source}: {meta_name} lacks {names_key!r}: re-download the dataset.')
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])

    def load(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            batch = _unpickle(read(name), name, source)
            if b'data' not in batch or label_key not in batch:
                raise DataError(f'{source}: {name} lacks b"data" or {label_key!r}: re-download the dataset.')
            rows = np.asarray(batch[b'data'])
            if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
                raise DataError(f'{source}: {name} holds {rows.dtype} {rows.shape}, expected uint8 (N, 3072) '
                                'rows: re-download the dataset.')
            # Each row is channel-major: 1024 red, then green, then blue values.
            xs.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = load(train_names)
    x_test, y_test = load(test_names)
    return _RawSplits(np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test, class_names)


# --------------------------------------------------------------------------------------------
# Class folders: root/{train,test}/<class>/<image>, on disk or inside a tarball.

# split -> class -> [(file name, reader of its bytes)], files sorted by name.
_ClassTree = dict[str, dict[str, list[tuple[str, Callable[[], bytes]]]]]


def _class_folder_source(root: Path, cache_name: str | None = None) -> _Source:
    tree: _ClassTree = {}
    files = []
    for split in ('train', 'test'):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f'{root}: no {split}/ folder: a class-folder dataset needs {root}/train/<class>/ '
                            f'and {root}/test/<class>/ with the images.')
        tree[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.')):
            images = sorted(p for p in class_dir.iterdir() if _is_image_name(p.name))
            tree[split][class_dir.name] = [(p.name, p.read_bytes) for p in images]
            files.extend(images)
    name = cache_name or f'folder-{root.name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}'
    return _Source(name, tuple(files), lambda: _decode_class_tree(tree, str(root)))


def _is_image_name(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMAGE_SUFFIXES)


def _class_tree_from_tar(tarball: Path, root: str) -> _ClassTree:
    """Reads every root/{train,test}/<class>/<image> member of a gzip'd tarball into memory."""
    log.info('%s: reading the images (the first load decodes them all; later loads read the cache)', tarball)
    tree: _ClassTree = {'train': {}, 'test': {}}
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for member in tar:
                parts = Path(member.name).parts
                if parts and parts[0] == '.':
                    parts = parts[1:]
                if len(parts) == 4 and parts[0] == root and parts[1] in tree:
                    if member.isfile() and _is_image_name(parts[3]):
                        content = tar.extractfile(member).read()
                        tree[parts[1]].setdefault(parts[2], []).append((parts[3], lambda c=content: c))
                elif len(parts) == 3 and parts[0] == root and parts[1] in tree and member.isdir():
                    tree[parts[1]].setdefault(parts[2], [])
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f'{tarball}: unreadable tarball ({error}): re-download or re-pack it.') from None
    for split in tree:
        if not tree[split]:
            raise DataError(f'{tarball}: no {root}/{split}/<class>/<image> members: the tarball must hold '
                            f'{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg.')
        for images in tree[split].values():
            images.sort(key=lambda item: item[0])
    return tree


def _class_order(names: Iterable[str]) -> tuple[str, ...]:
    names = sorted(names)
    return CIFAR10_CLASSES if set(names) == set(CIFAR10_CLASSES) else tuple(names)


def _decode_class_tree(tree: _ClassTree, source: str) -> _RawSplits:
    if set(tree['train']) != set(tree['test']):
        raise DataError(f'{source}: train/ and test/ hold different class folders '
                        f'({sorted(set(tree["train"]) ^ set(tree["test"]))} in only one): give both splits '
                        'the same class folders.')
    class_names = _class_order(tree['train'])
    if not class_names:
        raise DataError(f'{source}: train/ holds no class folders: add one folder of images per class.')
    for split in ('train', 'test'):
        for name in class_names:
            if not tree[split][name]:
                raise DataError(f'{source}: class folder {split}/{name}/ holds no PNG/JPEG images: add '
                                'images or remove the folder.')
    splits = []
    for split in ('train', 'test'):
        entries = [(f'{split}/{name}/{file_name}', read, label)
                   for label, name in enumerate(class_names) for file_name, read in tree[split][name]]
        splits.append(_decode_images(entries, source))
    (x_train, y_train), (x_test, y_test) = splits
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f'{source}: train images are {x_train.shape[1:]} but test images {x_test.shape[1:]}: '
                        'resize all images to one size.')
    return _RawSplits(x_train, y_train, x_test, y_test, class_names)


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError('Decoding PNG/JPEG images needs Pillow: pip install pillow '
                        "(or pip install 'ntkdd[images]').") from None
    return Image


def _decode_one(read: Callable[[], bytes], where: str) -> np.ndarray:
    Image = _pillow()
    try:
        with Image.open(io.BytesIO(read())) as image:
            gray = image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F')
            pixels = np.asarray(image.convert('L' if gray else 'RGB'))
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f'{where}: not a readable PNG/JPEG image ({error}): replace or remove it.') from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _decode_images(entries: list[tuple[str, Callable[[], bytes], int]], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes images in order, on a few threads (Pillow releases the GIL while decoding), logging progress."""
    _pillow()
    started = time.monotonic()
    decoded: list[np.ndarray] = []
    chunk = 5000
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(entries), chunk):
            part = entries[start:start + chunk]
            decoded.extend(pool.map(lambda e: _decode_one(e[1], f'{source}: {e[0]}'), part))
            if len(entries) > chunk:
                log.info('%s: decoded %d/%d images (%.1f s)', source, len(decoded), len(entries),
                         time.monotonic() - started)
    shape = decoded[0].shape[:2]
    channels = max(d.shape[2] for d in decoded)
    for (where, _, _), pixels in zip(entries, decoded):
        if pixels.shape[:2] != shape:
            raise DataError(f'{source}: {where} is {pixels.shape[1]}x{pixels.shape[0]} but '
                            f'{entries[0][0]} is {shape[1]}x{shape[0]}: resize all images to one size.')
    # Grayscale images among colour ones are repeated over the three channels.
    x = np.stack([np.broadcast_to(d, shape + (channels,)) for d in decoded])
    y = np.array([label for _, _, label in entries], dtype=np.int32)
    return x, y


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
