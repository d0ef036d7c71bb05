"""Support sets of the RCIG and FRePo code: flax msgpack checkpoints read without flax."""
import json

import numpy as np
import pytest

msgpack = pytest.importorskip('msgpack')

from ntkdd.launch import cli  # pylint: disable=wrong-import-position
from ntkdd.server import distill, evaluate, foreign_sets  # pylint: disable=wrong-import-position


def _flax_ext(value):
  """flax.serialization's packing of numpy leaves, written out: arrays as extension type 1
  and numpy scalars as type 3, each the msgpack of (shape, dtype name, C-order bytes)."""
  if isinstance(value, np.ndarray):
    return msgpack.ExtType(1, msgpack.packb((value.shape, value.dtype.name, value.tobytes('C')),
                                            use_bin_type=True))
  if isinstance(value, np.generic):
    array = np.asarray(value)
    return msgpack.ExtType(3, msgpack.packb((array.shape, array.dtype.name, array.tobytes('C')),
                                            use_bin_type=True))
  raise TypeError(f'unexpected leaf {type(value)}')


def _write(path, state):
  path.write_bytes(msgpack.packb(state, default=_flax_ext, strict_types=True))
  return path


def _rcig_like_state(rng, images, labels, ema_images, ema_labels):
  """The nesting of an RCIG CoresetTrainState checkpoint (a FRePo ProtoState is the same
  where it matters: params and ema_average hold x_proto and y_proto)."""
  leaves = lambda x, y: {'log_temp': np.float32(0.3), 'x_proto': x, 'y_proto': y}
  return {'step': np.int32(15000), 'params': leaves(images, labels),
          'opt_state': {'0': {'inner_state': {'0': {'count': np.int32(7),
                                                    'mu': leaves(images * 0, labels * 0)},
                                              '1': {}}}},
          'train_it': np.int32(15000),
          'ema_hidden': leaves(rng.normal(size=images.shape).astype(np.float32), labels),
          'ema_average': leaves(ema_images, ema_labels)}


def _set(rng, n=3, shape=(8, 8, 1), classes=3):
  images = rng.normal(size=(n,) + shape).astype(np.float32)
  labels = (np.eye(classes, dtype=np.float32)[np.arange(n) % classes] - 1 / classes
            + 0.1 * rng.normal(size=(n, classes)).astype(np.float32))
  return images, labels


def test_reads_the_ema_copy_of_a_flax_checkpoint_and_falls_back_to_params(tmp_path):
  rng = np.random.default_rng(0)
  images, labels = _set(rng)
  ema_images, ema_labels = _set(rng)
  path = _write(tmp_path / 'checkpoint_15000', _rcig_like_state(rng, images, labels,
                                                                ema_images, ema_labels))
  assert foreign_sets.is_flax_checkpoint(path) and foreign_sets.is_flax_checkpoint(tmp_path)
  state = foreign_sets.read_state_dict(path)
  assert state['step'] == 15000 and state['params']['log_temp'] == np.float32(0.3)
  got_images, got_labels, label_ids, place = foreign_sets.load_flax_support(tmp_path, (8, 8, 1),
                                                                            3)
  assert place == 'ema_average'
  np.testing.assert_array_equal(got_images, ema_images)
  np.testing.assert_array_equal(got_labels, ema_labels)
  np.testing.assert_array_equal(label_ids, np.argmax(ema_labels, 1))
  # FRePo's state before its EMA starts: ema_average is None, the parameters are read.
  frepo = {'step': np.int32(3), 'params': {'x_proto': images, 'y_proto': labels},
           'epoch': 0, 'best_val_acc': 0.0, 'ema_hidden': None, 'ema_average': None,
           'ema_count': 0}
  (tmp_path / 'frepo').mkdir()
  path = _write(tmp_path / 'frepo' / 'checkpoint_3', frepo)
  got_images, got_labels, _, place = foreign_sets.load_flax_support(path, (8, 8, 1), 3)
  assert place == 'params'
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def test_chunked_arrays_and_the_newest_checkpoint_of_a_folder(tmp_path):
  rng = np.random.default_rng(1)
  images, labels = _set(rng, n=2)
  flat = images.reshape(-1)
  # flax splits arrays over 2^30 bytes into flat chunks keyed '0', '1', ...
  chunked = {'__msgpack_chunked_array__': True,
             'shape': {str(i): d for i, d in enumerate(images.shape)},
             'chunks': {'0': flat[:50], '1': flat[50:]}}
  _write(tmp_path / 'checkpoint_2', {'params': {'x_proto': images * 0, 'y_proto': labels}})
  _write(tmp_path / 'checkpoint_10', {'params': {'x_proto': chunked, 'y_proto': labels}})
  assert foreign_sets.checkpoint_file(tmp_path).name == 'checkpoint_10'
  got, _, _, _ = foreign_sets.load_flax_support(tmp_path, (8, 8, 1), 3)
  np.testing.assert_array_equal(got, images)


def test_bad_checkpoints_name_the_problem(tmp_path):
  rng = np.random.default_rng(2)
  images, labels = _set(rng)
  path = _write(tmp_path / 'checkpoint_1', {'params': {'w': images}})
  with pytest.raises(ValueError, match='No x_proto'):
    foreign_sets.load_flax_support(path, (8, 8, 1), 3)
  path = _write(tmp_path / 'checkpoint_1', {'params': {'x_proto': images, 'y_proto': labels}})
  with pytest.raises(ValueError, match=r'x_proto has shape .* \(28, 28, 1\)'):
    foreign_sets.load_flax_support(path, (28, 28, 1), 3)
  with pytest.raises(ValueError, match='y_proto has shape'):
    foreign_sets.load_flax_support(path, (8, 8, 1), 10)
  np.savez(tmp_path / 'support.npz', images=images)
  assert not foreign_sets.is_flax_checkpoint(tmp_path / 'support.npz')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no checkpoint_'):
    foreign_sets.checkpoint_file(tmp_path / 'empty')


def test_evaluate_reads_a_checkpoint_in_the_named_preprocessed_space(tiny_npz, tmp_path,
                                                                     capsys):
  # A set "made elsewhere" in the standardised space: real training images preprocessed as
  # that code would, with one-hot-minus-1/C labels.
  prepared = distill.prepare_data(distill.DistillConfig(dataset=tiny_npz, data_dir='.',
                                                        preprocess='standardize'))
  pick = [0, 12, 24]
  images = prepared.x_train[pick]
  labels = np.eye(3, dtype=np.float32)[prepared.y_train[pick]] - 1 / 3
  rng = np.random.default_rng(3)
  folder = tmp_path / 'rcig_out'
  folder.mkdir()
  _write(folder / 'checkpoint_100', _rcig_like_state(rng, images * 0, labels, images, labels))
  support = evaluate.load_support(str(folder), prepared)
  np.testing.assert_array_equal(support.images, images)
  np.testing.assert_array_equal(support.label_ids, [0, 1, 2])
  with pytest.raises(ValueError, match='drop --pixels'):
    evaluate.load_support(str(folder), prepared, pixels=True)
  common = ['evaluate', '--support', str(folder), '--dataset', tiny_npz, '--data-dir', '.',
            '--transfer', '', '--arch', 'fc', '--out', str(tmp_path / 'evaluation.json')]
  assert cli.main(common) == 2
  assert '--preprocess' in capsys.readouterr().err
  assert cli.main(common + ['--preprocess', 'standardize']) == 0
  report = json.loads((tmp_path / 'evaluation.json').read_text())
  assert report['images'] == 3
  # Three real images, one per class, of well-separated classes: KRR is far above chance.
  assert report['distilled']['krr']['test_accuracy'] > 0.6
