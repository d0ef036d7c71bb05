"""Dataset formats on disk (idx, CIFAR pickles, class folders, PNG/JPEG): finding and decoding them."""
from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

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

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_IDX_UBYTE = 0x08


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says how to fix it."""


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


class _MissingFiles(Exception):
    """Raised inside the loader when a standard dataset's files are absent; load_dataset adds the fix."""


def _standard_source(name: str, data_dir: Path) -> _Source:
    if name in ('mnist', 'fashion_mnist'):
        return _idx_source(name, data_dir)
    if name == 'cifar10':
        return _cifar10_source(data_dir)
    return _cifar100_source(data_dir)


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
