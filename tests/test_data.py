"""Tests of ntkdd.common.data on tiny datasets built in tmp_path (and real MNIST when present)."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntkdd.common import data
from ntkdd.common.data import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


# --------------------------------------------------------------------------------------------
# Fixture writers in the official layouts.


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def tiny_idx_arrays(rng: np.random.Generator):
    x_train = rng.integers(0, 256, (12, 4, 5), dtype=np.uint8)
    y_train = np.arange(12, dtype=np.uint8) % 10
    x_test = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    y_test = np.array([7, 2, 1], np.uint8)
    return x_train, y_train, x_test, y_test


def write_idx_set(folder: Path, arrays, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for base, array in zip(data.IDX_FILES, arrays):
        content = idx_bytes(array)
        if compress:
            (folder / (base + '.gz')).write_bytes(gzip.compress(content))
        else:
            (folder / base).write_bytes(content)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 -> the official N x 3072 channel-major rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def add_pickle(tar: tarfile.TarFile, name: str, obj) -> None:
    content = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def write_cifar10_tarball(path: Path, rng: np.random.Generator):
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    with tarfile.open(path, 'w:gz') as tar:
        for i in range(5):  # two images per train batch, two test images
            add_pickle(tar, f'cifar-10-batches-py/data_batch_{i + 1}',
                       {b'batch_label': b'x', b'data': cifar_rows(x[2 * i:2 * i + 2]), b'labels': list(y[2 * i:2 * i + 2])})
        add_pickle(tar, 'cifar-10-batches-py/test_batch', {b'data': cifar_rows(x[10:]), b'labels': list(y[10:])})
        add_pickle(tar, 'cifar-10-batches-py/batches.meta',
                   {b'label_names': [n.encode() for n in data.CIFAR10_CLASSES], b'num_vis': 3072})
    return x, y


def save_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)


def write_class_tree(root: Path, classes, rng, per_class=(2, 1), shape=(6, 5, 3), suffix='.png'):
    """root/{train,test}/<class>/NNNN<suffix>; returns {split: (images, labels)} in loader order."""
    expected = {}
    for split, count in zip(('train', 'test'), per_class):
        xs, ys = [], []
        for label, name in enumerate(classes):
            for i in range(count):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                save_image(root / split / name / f'{i:04d}{suffix}', pixels)
                xs.append(pixels)
                ys.append(label)
        expected[split] = (np.stack(xs), np.array(ys))
    return expected


# --------------------------------------------------------------------------------------------
# Formats.


@pytest.mark.parametrize('compress,subdir', [(True, ''), (True, 'mnist'), (False, '')])
def test_mnist_idx_round_trip(tmp_path, compress, subdir):
    arrays = tiny_idx_arrays(np.random.default_rng(0))
    write_idx_set(tmp_path / subdir, arrays, compress)
    ds = data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'cache')
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.image_shape == (4, 5, 1) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays[0] / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, arrays[1])
    np.testing.assert_array_equal(ds.x_test[..., 0] * 255, arrays[2])
    np.testing.assert_array_equal(ds.y_test, [7, 2, 1])


def test_fashion_mnist_from_its_subfolder(tmp_path):
    arrays = tiny_idx_arrays(np.random.default_rng(1))
    write_idx_set(tmp_path / 'fashion_mnist', arrays)
    ds = data.load_dataset('fashion_mnist', tmp_path, cache_dir=tmp_path / 'cache')
    assert ds.class_names[0] == 'T-shirt/top' and ds.name == 'fashion_mnist'
    np.testing.assert_array_equal(ds.y_test, [7, 2, 1])


@pytest.mark.parametrize('extracted', [False, True])
def test_cifar10_python(tmp_path, extracted):
    x, y = write_cifar10_tarball(tmp_path / data.CIFAR10_TARBALL, np.random.default_rng(2))
    if extracted:
        with tarfile.open(tmp_path / data.CIFAR10_TARBALL) as tar:
            tar.extractall(tmp_path)
        (tmp_path / data.CIFAR10_TARBALL).unlink()
    ds = data.load_dataset('cifar10', tmp_path, cache_dir=tmp_path / 'cache')
    assert ds.class_names == data.CIFAR10_CLASSES and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(ds.x_train * 255, x[:10])
    np.testing.assert_array_equal(ds.x_test * 255, x[10:])
    np.testing.assert_array_equal(ds.y_train, y[:10])


def test_cifar100_python_tarball(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    fine = [99, 0, 42, 7, 3]
    names = [f'class{i:02d}'.encode() for i in range(100)]
    with tarfile.open(tmp_path / data.CIFAR100_TARBALL, 'w:gz') as tar:
        add_pickle(tar, 'cifar-100-python/train', {b'data': cifar_rows(x[:3]), b'fine_labels': fine[:3],
                                                   b'coarse_labels': [0, 0, 0]})
        add_pickle(tar, 'cifar-100-python/test', {b'data': cifar_rows(x[3:]), b'fine_labels': fine[3:],
                                                  b'coarse_labels': [0, 0]})
        add_pickle(tar, 'cifar-100-python/meta', {b'fine_label_names': names, b'coarse_label_names': []})
    ds = data.load_dataset('cifar100', tmp_path, cache_dir=tmp_path / 'cache')
    assert ds.num_classes == 100 and ds.class_names[99] == 'class99'
    np.testing.assert_array_equal(ds.y_train, [99, 0, 42])
    np.testing.assert_array_equal(ds.x_test * 255, x[3:])


def test_npz_uint8_nhw_and_float_nhwc(tmp_path):
    rng = np.random.default_rng(4)
    x_train = rng.integers(0, 256, (6, 3, 3), dtype=np.uint8)
    y_train = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / 'u8.npz', x_train=x_train, y_train=y_train, x_test=x_train[:2], y_test=y_train[:2],
             class_names=np.array(['a', 'b', 'c']))
    ds = data.load_dataset(str(tmp_path / 'u8.npz'), tmp_path)
    assert ds.image_shape == (3, 3, 1) and ds.class_names == ('a', 'b', 'c') and ds.name == 'u8'
    np.testing.assert_allclose(ds.x_train[..., 0], x_train / 255, rtol=1e-6)

    x_float = rng.random((4, 2, 2, 3)).astype(np.float64)
    np.savez(tmp_path / 'f.npz', x_train=x_float, y_train=[0, 1, 0, 3], x_test=x_float[:1], y_test=[1])
    ds = data.load_dataset('f.npz', tmp_path)  # relative to data_dir
    assert ds.num_classes == 4 and ds.class_names == ('0', '1', '2', '3') and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train, x_float, rtol=1e-6)


def test_class_folder_tree_png_sorted_and_cifar_order(tmp_path):
    rng = np.random.default_rng(5)
    expected = write_class_tree(tmp_path / 'cats_dogs', ['dog', 'cat'], rng)
    ds = data.load_dataset(str(tmp_path / 'cats_dogs'), tmp_path, cache_dir=tmp_path / 'cache')
    assert ds.class_names == ('cat', 'dog')  # sorted folder names
    x, y = expected['train']
    # Written with dog as label 0; loaded with cat first.
    order = np.concatenate([np.flatnonzero(y == 1), np.flatnonzero(y == 0)])
    np.testing.assert_array_equal(ds.x_train * 255, x[order])
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1])

    # Exactly the CIFAR-10 folder names: the standard order, not the alphabetical one; grayscale PNGs
    # give one channel.
    shuffled = list(data.CIFAR10_CLASSES)[::-1]
    write_class_tree(tmp_path / 'gray10', shuffled, rng, per_class=(1, 1), shape=(4, 4, 1))
    ds = data.load_dataset(str(tmp_path / 'gray10'), tmp_path, cache_dir=tmp_path / 'cache')
    assert ds.class_names == data.CIFAR10_CLASSES and ds.image_shape == (4, 4, 1)


def test_cifar_order_differs_from_alphabetical_for_other_names():
    assert data._class_order(['b', 'a']) == ('a', 'b')
    assert data._class_order(sorted(data.CIFAR10_CLASSES)) == data.CIFAR10_CLASSES


def test_cifar10_jpg_tarball_and_extracted_tree(tmp_path):
    rng = np.random.default_rng(6)
    tree = tmp_path / 'build' / 'cifar10'
    write_class_tree(tree, data.CIFAR10_CLASSES, rng, per_class=(2, 1), shape=(32, 32, 3), suffix='.jpg')
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    with tarfile.open(data_dir / data.CIFAR10_JPG_TARBALL, 'w:gz') as tar:
        tar.add(tree, arcname='cifar10')
    ds = data.load_dataset('cifar10', data_dir, cache_dir=tmp_path / 'cache')
    assert ds.class_names == data.CIFAR10_CLASSES and ds.x_train.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, np.repeat(np.arange(10), 2))
    # JPEG is lossy: compare with Pillow's own decoding of the same files.
    first = np.asarray(Image.open(tree / 'train' / 'airplane' / '0001.jpg').convert('RGB'))
    np.testing.assert_array_equal(ds.x_train[1] * 255, first)

    (data_dir / data.CIFAR10_JPG_TARBALL).unlink()
    tree.rename(data_dir / 'cifar10')
    from_tree = data.load_dataset('cifar10', data_dir, cache_dir=tmp_path / 'cache')
    assert from_tree.checksum() == ds.checksum()


# --------------------------------------------------------------------------------------------
# Cache and checksum.


def test_cache_written_reused_and_invalidated(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    arrays = tiny_idx_arrays(rng)
    write_idx_set(tmp_path, arrays)
    monkeypatch.setenv('NTKDD_CACHE', str(tmp_path / 'user_cache'))
    first = data.load_dataset('mnist', tmp_path)  # default cache: $NTKDD_CACHE
    assert not (tmp_path / '.ntkdd_cache').exists()  # the data folder stays untouched
    cache_files = list((tmp_path / 'user_cache').glob('mnist-*.npz'))
    assert len(cache_files) == 1
    assert not list((tmp_path / 'user_cache').glob('*.tmp'))

    # A cache hit: the cached arrays come back, not the source's (proved by editing the cache).
    with np.load(cache_files[0]) as cached:
        entries = dict(cached)
    entries['y_test'] = np.array([0, 0, 0], np.int32)
    with open(cache_files[0], 'wb') as f:
        np.savez(f, **entries)
    np.testing.assert_array_equal(data.load_dataset('mnist', tmp_path).y_test, [0, 0, 0])

    # Changing a source file changes the key: decoded again, stale entry removed.
    x_test = arrays[2].copy()
    x_test[0, 0, 0] ^= 0xFF
    write_idx_set(tmp_path, (arrays[0], arrays[1], x_test, arrays[3]))
    os.utime(tmp_path / 't10k-images-idx3-ubyte.gz', ns=(1, 1))
    again = data.load_dataset('mnist', tmp_path)
    np.testing.assert_array_equal(again.y_test, [7, 2, 1])
    assert round(float(again.x_test[0, 0, 0, 0]) * 255) == x_test[0, 0, 0]
    assert len(list((tmp_path / 'user_cache').glob('mnist-*.npz'))) == 1
    assert first.checksum() != again.checksum()


def test_checksum_is_stable_and_content_sensitive(tmp_path):
    arrays = tiny_idx_arrays(np.random.default_rng(8))
    write_idx_set(tmp_path, arrays)
    a = data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'c1')
    b = data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'c2')
    assert a.checksum() == b.checksum() and len(a.checksum()) == 64
    changed = data.Dataset('mnist', a.x_train, a.y_train[::-1].copy(), a.x_test, a.y_test, a.class_names)
    assert changed.checksum() != a.checksum()
    assert not a.x_train.flags.writeable


# --------------------------------------------------------------------------------------------
# Errors name the problem and the fix.


def test_missing_files_lists_names_and_download(tmp_path):
    with pytest.raises(DataError) as error:
        data.load_dataset('mnist', tmp_path)
    message = str(error.value)
    assert 'train-images-idx3-ubyte.gz' in message and 't10k-labels-idx1-ubyte.gz' in message
    assert str(tmp_path / 'mnist') in message and '--download' in message
    with pytest.raises(DataError, match=r'cifar-10-python\.tar\.gz.*--download'):
        data.load_dataset('cifar10', tmp_path)


def test_unknown_name_lists_valid_choices(tmp_path):
    with pytest.raises(DataError) as error:
        data.load_dataset('imagenet', tmp_path)
    assert all(n in str(error.value) for n in data.STANDARD_DATASETS) and '.npz' in str(error.value)
    with pytest.raises(DataError, match='check the path'):
        data.load_dataset('nope.npz', tmp_path)


def test_idx_wrong_magic_and_truncated(tmp_path):
    arrays = tiny_idx_arrays(np.random.default_rng(9))
    write_idx_set(tmp_path, arrays)
    path = tmp_path / 'train-labels-idx1-ubyte.gz'
    path.write_bytes(gzip.compress(b'\x00\x00\x0d\x01' + idx_bytes(arrays[1])[4:]))
    with pytest.raises(DataError, match='magic number.*re-download'):
        data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'cache')
    path.write_bytes(gzip.compress(idx_bytes(arrays[1])[:-3]))
    with pytest.raises(DataError, match='truncated.*re-download'):
        data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'cache')
    path.write_bytes(gzip.compress(idx_bytes(arrays[1]))[:-10])
    with pytest.raises(DataError, match='re-download'):
        data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'cache')


def test_idx_count_mismatch(tmp_path):
    x_train, y_train, x_test, y_test = tiny_idx_arrays(np.random.default_rng(10))
    write_idx_set(tmp_path, (x_train, y_train[:-1], x_test, y_test))
    with pytest.raises(DataError, match='12 train images but 11 train labels.*one label'):
        data.load_dataset('mnist', tmp_path, cache_dir=tmp_path / 'cache')


@pytest.mark.parametrize('arrays,pattern', [
    (dict(x_train=np.zeros(4), y_train=[0, 1, 0, 1]), r'NHW .*reshape'),
    (dict(x_train=np.array([['a'] * 2] * 4)[..., None], y_train=[0, 1, 0, 1]), 'not image pixels'),
    (dict(x_train=np.zeros((4, 2, 2)), y_train=[0, 1, 0]), '4 train images but 3 train labels'),
    (dict(x_train=np.zeros((4, 2, 2)), y_train=[0, 1, 0, -1]), 'outside|spans'),
    (dict(x_train=np.full((4, 2, 2), np.nan), y_train=[0, 1, 0, 1]), 'NaN or inf.*replace'),
    (dict(x_train=np.full((4, 2, 2), 200.0), y_train=[0, 1, 0, 1]), r'not \[0, 1\].*divide by 255'),
    (dict(x_train=np.zeros((4, 3, 8, 8), np.uint8), y_train=[0, 1, 0, 1]), 'channels-first.*transpose'),
    (dict(x_train=np.zeros((4, 2, 2)), y_train=[0, 1, 0, 5], class_names=np.array(['a', 'b'])),
     r'outside 0\.\.1 for 2 classes.*fix the labels'),
])
def test_npz_errors(tmp_path, arrays, pattern):
    x_test = np.zeros((1,) + np.shape(arrays['x_train'])[1:], np.asarray(arrays['x_train']).dtype)
    np.savez(tmp_path / 'bad.npz', x_test=x_test, y_test=[0], **arrays)
    with pytest.raises(DataError, match=pattern):
        data.load_dataset(str(tmp_path / 'bad.npz'), tmp_path)


def test_npz_missing_keys(tmp_path):
    np.savez(tmp_path / 'bad.npz', x_train=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match=r"missing keys \['y_train', 'x_test', 'y_test'\].*needs"):
        data.load_dataset(str(tmp_path / 'bad.npz'), tmp_path)


def test_class_folder_errors(tmp_path):
    rng = np.random.default_rng(11)
    write_class_tree(tmp_path / 'ds', ['a', 'b'], rng)
    (tmp_path / 'ds' / 'test' / 'b' / '0000.png').unlink()
    with pytest.raises(DataError, match=r'test/b/ holds no PNG/JPEG images: add images'):
        data.load_dataset(str(tmp_path / 'ds'), tmp_path, cache_dir=tmp_path / 'cache')
    save_image(tmp_path / 'ds' / 'test' / 'b' / '0000.png', rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
    with pytest.raises(DataError, match='resize all images to one size'):
        data.load_dataset(str(tmp_path / 'ds'), tmp_path, cache_dir=tmp_path / 'cache')
    (tmp_path / 'ds' / 'test' / 'b' / '0000.png').write_bytes(b'not a png')
    with pytest.raises(DataError, match='0000.png: not a readable PNG/JPEG image.*replace'):
        data.load_dataset(str(tmp_path / 'ds'), tmp_path, cache_dir=tmp_path / 'cache')
    (tmp_path / 'ds' / 'test' / 'c').mkdir()
    with pytest.raises(DataError, match=r"different class folders \(\['c'\]"):
        data.load_dataset(str(tmp_path / 'ds'), tmp_path, cache_dir=tmp_path / 'cache')


def test_missing_pillow_says_pip_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == 'PIL' or name.startswith('PIL.'):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_pil)
    with pytest.raises(DataError, match='pip install pillow'):
        data._pillow()


# --------------------------------------------------------------------------------------------
# Downloads from a local HTTP server.


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / 'served'
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f'http://127.0.0.1:{server.server_address[1]}/'
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def served_digests(served: Path) -> dict:
    """The sha256 of each MNIST file a test server serves, as download_dataset's `checksums`."""
    return {name: ('sha256', hashlib.sha256((served / name).read_bytes()).hexdigest())
            for name in data.DOWNLOAD_CHECKSUMS['mnist']}


def test_download_verifies_and_loads(tmp_path, http_server):
    served, url = http_server
    arrays = tiny_idx_arrays(np.random.default_rng(12))
    write_idx_set(served, arrays)
    sums = served_digests(served)
    data_dir = tmp_path / 'data'
    paths = data.download_dataset('mnist', data_dir, base_url=url, checksums=sums)
    assert [p.name for p in paths] == list(data.DOWNLOAD_CHECKSUMS['mnist'])
    assert all(p.parent == data_dir / 'mnist' and p.is_file() for p in paths)
    ds = data.load_dataset('mnist', data_dir, cache_dir=tmp_path / 'cache')
    np.testing.assert_array_equal(ds.y_train, arrays[1])


def test_download_checksum_mismatch_is_refused(tmp_path, http_server):
    served, url = http_server
    write_idx_set(served, tiny_idx_arrays(np.random.default_rng(13)))
    sums = {name: ('md5', '0' * 32) for name in data.DOWNLOAD_CHECKSUMS['mnist']}
    got = hashlib.md5((served / 'train-images-idx3-ubyte.gz').read_bytes()).hexdigest()
    with pytest.raises(DataError) as error:
        data.download_dataset('mnist', tmp_path, base_url=url, checksums=sums)
    assert '0' * 32 in str(error.value) and got in str(error.value)
    assert not (tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz').exists()
    assert (tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz.rejected').exists()


def test_download_unreachable_names_the_target(tmp_path, http_server):
    _, url = http_server  # served folder is empty: 404
    with pytest.raises(DataError, match=f'put them in {tmp_path}'):
        data.download_dataset('cifar10', tmp_path, base_url=url)
    assert not list(tmp_path.glob('*.part'))


def test_offline_download_is_one_message_naming_every_file_and_the_folder(tmp_path):
    # Nothing listens on port 1 of loopback: as offline as a machine gets.
    with pytest.raises(DataError) as error:
        data.download_dataset('mnist', tmp_path / 'data', base_url='http://127.0.0.1:1/')
    message = str(error.value)
    assert all(name in message for name in data.DOWNLOAD_CHECKSUMS['mnist'])
    assert f'put them in {tmp_path / "data" / "mnist"}' in message and 'NTKDD_DOWNLOAD_URL' in message
    assert not list((tmp_path / 'data' / 'mnist').iterdir())


def test_mirror_from_the_environment_is_checked_against_the_official_digests(tmp_path, http_server,
                                                                           monkeypatch):
    """A mirror serving files that are not the official ones is refused by the real digests."""
    served, url = http_server
    write_idx_set(served, tiny_idx_arrays(np.random.default_rng(15)))
    monkeypatch.setenv(data.DOWNLOAD_URL_ENV, url)
    with pytest.raises(DataError, match='md5 digest mismatch: expected f68b3c2dcbeaaa9fbdd348bbdeb94873'):
        data.load_dataset('mnist', tmp_path / 'data', cache_dir=tmp_path / 'cache', download=True)
    folder = tmp_path / 'data' / 'mnist'
    assert (folder / 'train-images-idx3-ubyte.gz.rejected').exists()
    assert not (folder / 'train-images-idx3-ubyte.gz').exists()


def test_mirror_from_the_environment_is_used(tmp_path, http_server, monkeypatch):
    served, url = http_server
    arrays = tiny_idx_arrays(np.random.default_rng(16))
    write_idx_set(served, arrays)
    sums = served_digests(served)
    monkeypatch.setitem(data.DOWNLOAD_CHECKSUMS, 'mnist', sums)   # the tiny files' own digests
    monkeypatch.setenv(data.DOWNLOAD_URL_ENV, url)
    ds = data.load_dataset('mnist', tmp_path / 'data', cache_dir=tmp_path / 'cache', download=True)
    np.testing.assert_array_equal(ds.y_train, arrays[1])


def test_official_digests_are_well_formed():
    for files in data.DOWNLOAD_CHECKSUMS.values():
        for algorithm, digest in files.values():
            assert len(digest) == hashlib.new(algorithm).digest_size * 2


# --------------------------------------------------------------------------------------------
# The real MNIST.


@pytest.mark.skipif(not (SHARED_DATA / 'mnist').is_dir(), reason=f'no MNIST at {SHARED_DATA}/mnist')
def test_real_mnist(tmp_path):
    ds = data.load_dataset('mnist', SHARED_DATA, cache_dir=tmp_path)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert abs(float(ds.x_train.mean(dtype=np.float64)) - 0.1307) < 5e-4
    assert abs(float(ds.x_train.std(dtype=np.float64)) - 0.3081) < 5e-4
    np.testing.assert_array_equal(ds.y_train[:5], [5, 0, 4, 1, 9])
    np.testing.assert_array_equal(ds.y_test[:5], [7, 2, 1, 0, 4])


def test_load_with_download_fetches_missing_files(tmp_path, http_server, monkeypatch):
    served, url = http_server
    arrays = tiny_idx_arrays(np.random.default_rng(14))
    write_idx_set(served, arrays)
    sums = served_digests(served)
    monkeypatch.setitem(data.DOWNLOAD_BASE_URLS, 'mnist', url)
    monkeypatch.setitem(data.DOWNLOAD_CHECKSUMS, 'mnist', sums)
    ds = data.load_dataset('mnist', tmp_path / 'data', cache_dir=tmp_path / 'cache', download=True)
    np.testing.assert_array_equal(ds.y_test, arrays[3])
