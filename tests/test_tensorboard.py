"""--tensorboard: the event files hold every step's scalars and the support grid of each evaluation.

The events are read back by parsing the TFRecord framing and tensorboardX's own Event protos.
"""
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('tensorboardX')
from tensorboardX.proto import event_pb2  # noqa: E402

from ntkdd.launch import cli  # noqa: E402
from ntkdd.server import pictures, tensorboard_log  # noqa: E402


def read_events(run_dir: Path) -> list:
  """Every Event in the run directory's event files (TFRecord: length, crc, data, crc)."""
  events = []
  for path in sorted(run_dir.glob('events.out.tfevents.*')):
    content = path.read_bytes()
    offset = 0
    while offset < len(content):
      (length,) = struct.unpack('<Q', content[offset:offset + 8])
      data = content[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      events.append(event_pb2.Event.FromString(data))
  return events


def scalars(events) -> dict:
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField('simple_value'):
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def images(events) -> dict:
  return {event.step: value.image for event in events for value in event.summary.value
          if value.HasField('image')}


def metrics(run_dir: Path) -> list:
  return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_kip_events_hold_the_scalars_and_the_support_grid_of_each_evaluation(tiny_npz,
                                                                            tmp_path):
  run = tmp_path / 'kip'
  assert cli.main(['distill', '--dataset', tiny_npz, '--data-dir', '.', '--ipc', '2',
                   '--steps', '4', '--target-batch', '12', '--eval-every', '2', '--lr', '0.05',
                   '--learn-labels', '--no-progress', '--tensorboard', '--out', str(run)]) == 0
  events = read_events(run)
  got = scalars(events)
  records = metrics(run)
  for key, tag in tensorboard_log.SCALAR_TAGS.items():
    want = {r['step']: r[key] for r in records if r.get(key) is not None}
    if key == 'test_accuracy':   # finite nets are not trained during KIP
      assert tag not in got
      continue
    assert want, key
    assert got[tag].keys() == want.keys(), (tag, got.get(tag), want)
    np.testing.assert_allclose([got[tag][s] for s in sorted(want)],
                               [want[s] for s in sorted(want)], rtol=1e-6)
  assert sorted(got['accuracy/krr_test']) == [0, 2, 4]
  assert sorted(got['loss']) == [1, 2, 3, 4]
  logged = images(events)
  assert sorted(logged) == [0, 2, 4]    # every evaluation, and only those
  # The last one is the final support set, drawn as pictures.support_grid_array draws it.
  Image = pytest.importorskip('PIL.Image')
  with np.load(run / 'support.npz') as support:
    want = pictures.support_grid_array(support['images_pixels'], support['label_ids'], 3)
  last = logged[4]
  assert (last.height, last.width, last.colorspace) == (*want.shape[:2], 3)
  decoded = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert('RGB'))
  np.testing.assert_array_equal(decoded, want)
  assert not np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(
      logged[0].encoded_image_string)).convert('RGB')))   # the images moved


def test_rcig_events_hold_the_finite_net_accuracy(tiny_npz, tmp_path):
  run = tmp_path / 'rcig'
  assert cli.main(['distill', '--algorithm', 'rcig', '--dataset', tiny_npz, '--data-dir', '.',
                   '--ipc', '2', '--steps', '2', '--depth', '1',
                   '--width', '8', '--pool-size', '2', '--inner-steps', '2', '--hinv-steps', '2',
                   '--rcig-target-batch', '12', '--eval-every', '2', '--eval-test-size', '6',
                   '--no-progress', '--tensorboard', '--out', str(run)]) == 0
  events = read_events(run)
  got = scalars(events)
  records = {r['step']: r for r in metrics(run)}
  assert sorted(got['accuracy/finite_net_test']) == [0, 2]
  assert got['accuracy/finite_net_test'][2] == pytest.approx(records[2]['test_accuracy'])
  assert sorted(got['loss']) == [1, 2]
  assert sorted(images(events)) == [0, 2]


def test_support_grid_array_places_each_class_on_its_row():
  pixels = np.zeros((3, 2, 2, 1), np.float32)
  pixels[1] = 1.0
  grid = pictures.support_grid_array(pixels, [0, 1, 1], num_classes=2, gap=1)
  assert grid.shape == (1 + 2 * 3, 1 + 2 * 3, 3)
  assert (grid[1:3, 1:3] == 0).all()          # class 0: the black image
  assert (grid[4:6, 1:3] == 255).all()        # class 1: the white one, then the black one
  assert (grid[4:6, 4:6] == 0).all()
  assert (grid[1:3, 4:6] == pictures.GRID_GAP_COLOR).all()   # class 0 has no second image


def test_missing_tensorboardx_is_one_clear_error(tiny_npz, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)
  code = cli.main(['distill', '--dataset', tiny_npz, '--data-dir', '.', '--ipc', '1',
                   '--steps', '1', '--target-batch', '12', '--no-progress', '--tensorboard', '--out',
                   str(tmp_path / 'x')])
  assert code == 2
  assert "pip install 'ntkdd[tensorboard]'" in capsys.readouterr().err
