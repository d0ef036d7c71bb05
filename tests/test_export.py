"""`ntkdd export`: a distilled set as an image-folder tree (PNG + labels.csv) or an npz."""
import csv

import numpy as np
import pytest

Image = pytest.importorskip('PIL.Image')

from ntkdd.common import data  # noqa: E402
from ntkdd.launch import cli  # noqa: E402


@pytest.fixture(scope='module')
def kip_run(tmp_path_factory):
  """A tiny KIP run with learned labels over an RGB npz dataset with named classes."""
  folder = tmp_path_factory.mktemp('export')
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
  y = np.repeat(np.arange(3), 10)
  np.savez(folder / 'rgb.npz', x_train=x, y_train=y, x_test=x[::3], y_test=y[::3],
           class_names=np.array(['cat', 'dog/wolf', 'emu']))
  run = folder / 'run'
  assert cli.main(['distill', '--dataset', str(folder / 'rgb.npz'), '--data-dir', '.',
                   '--ipc', '2', '--steps', '3', '--target-batch', '12', '--eval-every', '3',
                   '--lr', '0.05', '--learn-labels', '--no-progress', '--out', str(run)]) == 0
  return run


def test_folders_hold_one_png_per_image_and_the_learned_labels(kip_run, tmp_path, capsys):
  out = tmp_path / 'tree'
  assert cli.main(['export', str(kip_run), '--format', 'folders', '--out', str(out)]) == 0
  assert str(out) in capsys.readouterr().out
  with np.load(kip_run / 'support.npz') as support:
    pixels, labels = support['images_pixels'], support['labels']
    label_ids = support['label_ids']
  assert sorted(p.name for p in out.iterdir()) == ['0_cat', '1_dog_wolf', '2_emu', 'labels.csv']
  with open(out / 'labels.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(pixels) == 6
  for i, row in enumerate(rows):
    assert int(row['label_id']) == label_ids[i]
    assert row['class_name'] == ['cat', 'dog/wolf', 'emu'][label_ids[i]]
    png = np.asarray(Image.open(out / row['file']))
    assert png.dtype == np.uint8 and png.shape == (8, 8, 3)
    np.testing.assert_array_equal(png, np.round(np.clip(pixels[i], 0, 1) * 255))
    np.testing.assert_allclose([float(row[f'label_{k}']) for k in range(3)], labels[i],
                               rtol=1e-6)
  # Learned labels: not the one-hot-minus-1/C they started from.
  assert not np.allclose(labels, np.eye(3)[label_ids] - 1 / 3, atol=1e-4)
  # The folders load back as a class-folder dataset (one split here, copied as both).
  for split in ('train', 'test'):
    for folder in out.glob('*_*'):
      target = tmp_path / 'loadable' / split / folder.name
      target.mkdir(parents=True)
      for png in folder.iterdir():
        (target / png.name).write_bytes(png.read_bytes())
  loaded = data.load_dataset(str(tmp_path / 'loadable'), tmp_path, cache_dir=tmp_path / 'c')
  assert loaded.class_names == ('0_cat', '1_dog_wolf', '2_emu')
  np.testing.assert_array_equal(np.sort(loaded.y_train), np.sort(label_ids))


def test_grayscale_support_exports_single_channel_pngs(tiny_npz, tmp_path):
  run = tmp_path / 'gray'
  assert cli.main(['distill', '--algorithm', 'ls', '--dataset', tiny_npz, '--data-dir', '.',
                   '--ipc', '1', '--no-progress', '--out', str(run)]) == 0
  out = tmp_path / 'tree'
  assert cli.main(['export', str(run), '--out', str(out)]) == 0
  pngs = sorted(out.glob('*/*.png'))
  assert len(pngs) == 3 and Image.open(pngs[0]).mode == 'L'


def test_npz_export_has_the_support_keys(kip_run, tmp_path):
  out = tmp_path / 'sets' / 'distilled.npz'
  assert cli.main(['export', str(kip_run), '--format', 'npz', '--out', str(out)]) == 0
  with np.load(out) as got, np.load(kip_run / 'support.npz') as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key])


def test_export_refuses_a_non_empty_folder_and_a_missing_run(kip_run, tmp_path, capsys):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('x')
  assert cli.main(['export', str(kip_run), '--out', str(tmp_path / 'full')]) == 2
  assert 'is not empty' in capsys.readouterr().err
  assert cli.main(['export', str(tmp_path / 'nope'), '--out', str(tmp_path / 'o')]) == 2
  assert 'does not exist' in capsys.readouterr().err
  assert cli.main(['export', str(kip_run), '--format', 'npz', '--out',
                   str(tmp_path / 'o.txt')]) == 2
  assert 'name it *.npz' in capsys.readouterr().err
