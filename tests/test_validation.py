"""Bad and unusual input, one case each: a clear refusal (exit status, a message naming the bad
value and the fix, no traceback), never a wrong number with exit 0, never a run lost."""
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_npz
from ntkdd.common import architectures, data, kernels
from ntkdd.common import prepared as prepared_lib
from ntkdd.launch import cli
from ntkdd.server import checkpoint, distill

# A KIP run on the tiny set: 3 classes x 12 train images of 8x8x1, 2 steps, FC kernel.
KIP = ['--ipc', '2', '--steps', '2', '--target-batch', '12', '--eval-every', '1',
       '--checkpoint-every', '1', '--lr', '0.05', '--no-progress']
LS = ['--algorithm', 'ls', '--ipc', '2', '--no-progress']
RCIG = ['--algorithm', 'rcig', '--ipc', '1', '--steps', '1', '--depth', '1',
        '--width', '4', '--pool-size', '1', '--inner-steps', '1', '--hinv-steps', '1',
        '--rcig-target-batch', '6', '--eval-every', '0', '--no-progress']


def run(argv, capsys):
  """cli.main in-process: (exit status, stderr); stdout and stderr never hold a traceback."""
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert 'Traceback' not in out + err, out + err
  return code, err


def refused(argv, capsys, *needles, code=2):
  """A refusal: exit status `code`, and every needle (bad value, flag, fix) in the message."""
  got, err = run(argv, capsys)
  assert got == code, err
  for needle in needles:
    assert needle in err, f'{needle!r} not in: {err}'
  return err


def snapshot(folder: Path) -> dict:
  """Every file under folder -> sha256 of its bytes."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def distill_args(dataset, out, *extra, base=KIP):
  return ['distill', '--dataset', dataset, '--data-dir', '.', *base, '--out', out, *extra]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  return str(make_tiny_npz(tmp_path_factory.mktemp('data') / 'tiny.npz'))


@pytest.fixture(scope='module')
def kip_run(tiny, tmp_path_factory):
  """A finished KIP run (made once); tests copy it before touching it."""
  out = tmp_path_factory.mktemp('runs') / 'kip'
  assert cli.main([str(a) for a in distill_args(tiny, out)]) == 0
  return out


@pytest.fixture
def kip_copy(kip_run, tmp_path):
  out = tmp_path / 'kip'
  shutil.copytree(kip_run, out)
  return out


# -- Wrong results with exit 0. -------------------------------------------------------------------

@pytest.mark.parametrize('tile', ['-3', '0'])
@pytest.mark.parametrize('command', ['kernel', 'distill', 'distill-workers'])
def test_tile_below_one_is_refused(tiny, tmp_path, capsys, tile, command):
  if command == 'kernel':
    np.save(tmp_path / 'x.npy', np.ones((3, 8, 8, 1), np.float32))
    argv = ['kernel', '--x1', tmp_path / 'x.npy', '--out', tmp_path / 'k.npz', '--tile', tile]
  else:
    argv = distill_args(tiny, tmp_path / 'run', '--tile', tile)
    if command == 'distill-workers':
      argv += ['--workers', '2', '--block', '4']
  refused(argv, capsys, '--tile', tile, 'must be >= 1')
  assert not (tmp_path / 'k.npz').exists() and not (tmp_path / 'run').exists()


def test_tile_below_one_is_refused_by_the_library():
  x = np.ones((3, 4), np.float32)
  arch = architectures.Architecture('fc', 1)
  for tile in (0, -3):
    with pytest.raises(ValueError, match='tile must be >= 1'):
      kernels.compute_kernel(arch, x, tile=tile)
    with pytest.raises(ValueError, match='tile must be >= 1'):
      kernels.kernel_vjp(arch, x, x, g_ntk=np.ones((3, 3)), tile=tile)


def test_convnet_too_deep_for_the_image_is_refused_before_computing(tiny, tmp_path, capsys):
  # The boundary is real: on 8x8 images depth 3 is finite, depth 4 (a pool of a 1-pixel side)
  # comes out NaN without the check.
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  ntk3, _ = kernels.kernel_fn(architectures.Architecture('convnet', 3))(x, x)
  ntk4, _ = kernels.kernel_fn(architectures.Architecture('convnet', 4))(x, x)
  assert np.all(np.isfinite(ntk3)) and not np.any(np.isfinite(ntk4))
  np.save(tmp_path / 'x.npy', x)
  refused(['kernel', '--arch', 'convnet', '--depth', '5', '--x1', tmp_path / 'x.npy', '--out',
           tmp_path / 'k.npz'], capsys, 'depth 5', '8x8', '--depth 3')
  assert not (tmp_path / 'k.npz').exists()
  refused(distill_args(tiny, tmp_path / 'run', '--arch', 'convnet', '--depth', '4'), capsys,
          'depth 4', '--depth 3')
  assert not (tmp_path / 'run').exists()


def test_non_finite_kernel_is_an_error_not_a_file(tmp_path, capsys):
  # Finite inputs whose FC kernel overflows float32 (x.x ~ 1e40).
  np.save(tmp_path / 'x.npy', np.full((2, 4), 1e20, np.float32))
  refused(['kernel', '--arch', 'fc', '--x1', tmp_path / 'x.npy', '--out', tmp_path / 'k.npz'],
          capsys, 'NaN or inf', '--dtype float64')
  assert not (tmp_path / 'k.npz').exists()


@pytest.mark.parametrize('lr', ['0', '-0.01', 'nan'])
@pytest.mark.parametrize('base', ['kip', 'rcig'])
def test_zero_or_negative_learning_rate_is_refused(tiny, tmp_path, capsys, lr, base):
  argv = distill_args(tiny, tmp_path / 'run', base=KIP if base == 'kip' else RCIG)
  refused(argv + ['--lr', lr], capsys, '--lr', lr)
  assert not (tmp_path / 'run').exists()


def test_learning_rate_defaults_come_from_none_not_falsy_values():
  parse = lambda *a: cli._parser().parse_args(['distill', '--out', 'x', *a])

  def distill_config(args):
    cli._fill_defaults(args)   # as main does
    return cli._distill_config(args)

  assert distill_config(parse()).learning_rate == 0.01
  assert distill_config(parse('--lr', '1e-9')).learning_rate == 1e-9
  rcig_args = parse('--algorithm', 'rcig')
  assert distill_config(rcig_args).learning_rate == 3e-3 and rcig_args.w_std == 1.0
  # A zero that got past the flag check stays zero (and is refused), not the default.
  args = parse()
  args.lr = 0.0
  config = distill_config(args)
  assert config.learning_rate == 0.0
  with pytest.raises(ValueError, match='--lr must be > 0'):
    config.validate()
  from ntkdd.server import evaluate
  assert evaluate.TransferSettings().learning_rate is None


def test_evaluate_train_lr_zero_is_refused(kip_run, capsys):
  refused(['evaluate', '--support', kip_run / 'support.npz', '--train-lr', '0'], capsys,
          '--train-lr', 'must be > 0')


# -- Runs that can be lost or mislabelled. -------------------------------------------------------

def test_a_label_solve_run_is_not_overwritten(tiny, tmp_path, capsys):
  out = tmp_path / 'ls'
  assert run(distill_args(tiny, out, base=LS), capsys)[0] == 0
  before = snapshot(out)
  assert 'checkpoint.npz' not in before   # LS writes none: the old check looked only for it
  refused(distill_args(tiny, out), capsys, str(out), 'already holds a run', '--overwrite',
          '--resume')
  refused(distill_args(tiny, out, base=LS), capsys, 'already holds a run')
  refused(distill_args(tiny, out, '--resume', '--overwrite'), capsys, 'give one of them')
  assert snapshot(out) == before
  # --resume of an LS run has nothing to resume: refused, with the fix.
  refused(distill_args(tiny, out, '--resume', base=LS), capsys, 'Label Solve', '--overwrite')
  assert snapshot(out) == before
  # The explicit flag replaces it.
  assert run(distill_args(tiny, out, '--overwrite'), capsys)[0] == 0
  assert json.loads((out / 'summary.json').read_text())['algorithm'] == 'kip'


def test_resume_refuses_other_data_under_the_same_name(tiny, tmp_path, capsys, kip_run):
  # The run used data/tiny.npz via --data-dir; a folder holding other images under that name
  # is refused on --resume, the same images in another folder are accepted.
  first, other, same = (tmp_path / n for n in ('first', 'other', 'same'))
  for folder in (first, other, same):
    folder.mkdir()
  shutil.copy(tiny, first / 'tiny.npz')
  shutil.copy(tiny, same / 'tiny.npz')
  make_tiny_npz(other / 'tiny.npz', seed=7)
  out = tmp_path / 'run'
  args = lambda data_dir, *extra: ['distill', '--dataset', 'tiny.npz', '--data-dir', data_dir,
                                   *KIP, '--out', out, *extra]
  assert run(args(first), capsys)[0] == 0
  before = snapshot(out)
  refused(args(other, '--resume', '--steps', '3'), capsys, 'checksum', '--resume',
          'same data', 'new --out')
  assert snapshot(out) == before
  assert run(args(same, '--resume', '--steps', '3'), capsys)[0] == 0


def test_rcig_records_its_data_and_resume_checks_it(tiny, tmp_path, capsys):
  first, other = tmp_path / 'first', tmp_path / 'other'
  first.mkdir(), other.mkdir()
  shutil.copy(tiny, first / 'tiny.npz')
  make_tiny_npz(other / 'tiny.npz', seed=7)
  out = tmp_path / 'rcig'
  args = lambda data_dir, *extra: ['distill', '--dataset', 'tiny.npz', '--data-dir', data_dir,
                                   *RCIG, '--out', out, *extra]
  assert run(args(first), capsys)[0] == 0
  config = json.loads((out / 'config.json').read_text())
  assert config['flags']['dataset'] == 'tiny.npz' and config['dataset']['checksum']
  before = snapshot(out)
  refused(args(other, '--resume', '--steps', '2'), capsys, 'checksum', 'same data')
  assert snapshot(out) == before


@pytest.mark.parametrize('where', ['missing', 'empty'])
def test_resume_without_a_run_is_refused(tiny, tmp_path, capsys, where):
  out = tmp_path / 'typo'
  if where == 'empty':
    out.mkdir()
  refused(distill_args(tiny, out, '--resume'), capsys, str(out), 'no run to continue',
          'drop --resume')
  assert out.exists() == (where == 'empty')
  if where == 'empty':
    assert not list(out.iterdir())


def test_failed_starts_leave_no_run_directory(tiny, tmp_path, capsys, monkeypatch):
  # Refused before anything is written: --ipc larger than a class.
  refused(distill_args(tiny, tmp_path / 'a', '--ipc', '20'), capsys, '--ipc 20', '--ipc 12')
  assert not (tmp_path / 'a').exists()
  # Failing after config.json was written, before the first checkpoint: the files go again.
  from ntkdd.common import kip

  def broken(*args, **kwargs):
    raise FloatingPointError('The support kernel K_ss has NaN or inf entries.')

  monkeypatch.setattr(kip, 'krr_accuracies', broken)
  code, _ = run(distill_args(tiny, tmp_path / 'b'), capsys)
  assert code == 2 and not (tmp_path / 'b').exists()
  # A directory that was there before stays, empty.
  (tmp_path / 'c').mkdir()
  code, _ = run(distill_args(tiny, tmp_path / 'c'), capsys)
  assert code == 2 and (tmp_path / 'c').is_dir() and not list((tmp_path / 'c').iterdir())


def test_truncated_checkpoint_is_named(kip_copy, tiny, capsys):
  path = kip_copy / 'checkpoint.npz'
  path.write_bytes(path.read_bytes()[:200])
  before = snapshot(kip_copy)
  refused(distill_args(tiny, kip_copy, '--resume', '--steps', '3'), capsys, str(path),
          'damaged or truncated', '--overwrite')
  assert snapshot(kip_copy) == before


def test_checkpoint_without_its_metadata_is_named(kip_copy, tiny, capsys):
  path = kip_copy / 'checkpoint.npz'
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files if k != '__meta__'}
  np.savez(path, **arrays)
  before = snapshot(kip_copy)
  refused(distill_args(tiny, kip_copy, '--resume', '--steps', '3'), capsys, str(path),
          '__meta__', '--overwrite')
  assert snapshot(kip_copy) == before


def test_target_batch_larger_than_the_split_is_refused_before_writing(tiny, tmp_path, capsys):
  refused(distill_args(tiny, tmp_path / 'run', '--target-batch', '1000'), capsys,
          '--target-batch 1000', 'has 12', '--target-batch 36 or less')
  assert not (tmp_path / 'run').exists()


def test_nan_advice_works(tiny, tmp_path, capsys):
  out = tmp_path / 'run'
  err = refused(distill_args(tiny, out, '--lr', '1e30', '--steps', '6'), capsys, '--lr 1e+30',
                'smaller --lr', '--overwrite')
  assert (out / 'checkpoint.npz').exists()   # the last good checkpoint stays
  # The advice, followed, works.
  assert run(distill_args(tiny, out, '--lr', '0.05', '--overwrite'), capsys)[0] == 0, err
  assert json.loads((out / 'summary.json').read_text())['steps'] == 2


def _mnist_like(folder: Path, labels_offset: int = 0) -> None:
  rng = np.random.default_rng(0)
  arrays = (rng.integers(0, 256, (20, 4, 4), dtype=np.uint8), np.arange(20) % 10 + labels_offset,
            rng.integers(0, 256, (5, 4, 4), dtype=np.uint8), np.arange(5) % 10)
  folder.mkdir(parents=True)
  for base, array in zip(data.IDX_FILES, arrays):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(n).to_bytes(4, 'big')
                                                     for n in array.shape)
    (folder / (base + '.gz')).write_bytes(gzip.compress(header + array.tobytes()))


def test_decoded_cache_keeps_one_entry_per_source(tmp_path):
  cache = tmp_path / 'cache'
  _mnist_like(tmp_path / 'a')
  _mnist_like(tmp_path / 'b')
  _mnist_like(tmp_path / 'bad', labels_offset=5)   # labels up to 14: fails validation
  data.load_dataset('mnist', tmp_path / 'a', cache_dir=cache)
  entries_a = snapshot(cache)
  assert len(entries_a) == 1
  with pytest.raises(data.DataError, match='outside 0..9'):
    data.load_dataset('mnist', tmp_path / 'bad', cache_dir=cache)
  assert snapshot(cache) == entries_a   # the good entry stays; the bad source wrote nothing
  data.load_dataset('mnist', tmp_path / 'b', cache_dir=cache)
  after = snapshot(cache)
  assert len(after) == 2 and set(entries_a) <= set(after)   # two sources coexist


# -- Messages instead of tracebacks. --------------------------------------------------------------

def test_eval_and_checkpoint_every_zero(tiny, tmp_path, capsys):
  refused(distill_args(tiny, tmp_path / 'run', '--eval-every', '0'), capsys,
          '--eval-every must be >= 1', 'got 0')
  refused(distill_args(tiny, tmp_path / 'run', '--checkpoint-every', '0'), capsys,
          '--checkpoint-every', 'must be >= 1, got 0')
  assert not (tmp_path / 'run').exists()


def test_out_that_is_a_file_or_under_one(tiny, tmp_path, capsys):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('keep me')
  refused(distill_args(tiny, a_file), capsys, str(a_file), 'is a file', 'another --out')
  refused(distill_args(tiny, a_file / 'run'), capsys, 'lies under the file', str(a_file))
  assert a_file.read_text() == 'keep me'


def test_kernel_out_that_is_a_directory(tmp_path, capsys):
  np.save(tmp_path / 'x.npy', np.ones((2, 4), np.float32))
  refused(['kernel', '--arch', 'fc', '--x1', tmp_path / 'x.npy', '--out', tmp_path], capsys,
          f'--out {tmp_path} is a directory', 'kernel.npz')


def test_kernel_input_that_is_not_npy(tmp_path, capsys):
  np.savez(tmp_path / 'x.npz', x=np.ones((2, 4)))
  refused(['kernel', '--arch', 'fc', '--x1', tmp_path / 'x.npz', '--out', tmp_path / 'k.npz'],
          capsys, '--x1', 'not a .npy file', 'numpy.save')


def test_evaluate_support_that_is_a_directory_or_npy(kip_run, tmp_path, capsys):
  refused(['evaluate', '--support', kip_run, '--transfer', ''], capsys, 'is a directory',
          str(kip_run / 'support.npz'))
  np.save(tmp_path / 'support.npy', np.zeros((3, 8, 8, 1), np.float32))
  refused(['evaluate', '--support', tmp_path / 'support.npy', '--transfer', ''], capsys,
          'is a .npy file', 'numpy.savez')


def test_evaluate_on_a_config_without_flags(kip_copy, capsys):
  (kip_copy / 'config.json').write_text('{"command": "distill"}')
  before = snapshot(kip_copy)
  refused(['evaluate', '--support', kip_copy / 'support.npz', '--transfer', ''], capsys,
          'no "flags" record', str(kip_copy / 'config.json'))
  assert snapshot(kip_copy) == before


@pytest.mark.parametrize('algorithm', ['kip', 'rcig'])
def test_evaluate_takes_the_data_from_the_run(tiny, tmp_path, capsys, algorithm):
  # The README recipe: evaluate RUN/support.npz without repeating --dataset or --data-dir
  # (which is not the default 'data'); an RCIG run records them too.
  data_dir = tmp_path / 'data-elsewhere'
  data_dir.mkdir()
  shutil.copy(tiny, data_dir / 'tiny.npz')
  out = tmp_path / algorithm
  assert run(['distill', '--dataset', 'tiny.npz', '--data-dir', data_dir,
              *(KIP if algorithm == 'kip' else RCIG), '--out', out], capsys)[0] == 0
  code, err = run(['evaluate', '--support', out / 'support.npz', '--transfer', ''], capsys)
  assert code == 0, err
  report = json.loads((out / 'evaluation.json').read_text())
  assert report['dataset'] == 'tiny' and report['images'] == (6 if algorithm == 'kip' else 3)
  assert np.isfinite(report['distilled']['krr']['test_accuracy'])


def test_evaluate_checks_the_support_file_before_loading_data(tmp_path, capsys):
  refused(['evaluate', '--support', tmp_path / 'nope.npz', '--dataset', 'mnist', '--data-dir',
           tmp_path / 'no-data'], capsys, 'nope.npz does not exist', 'support.npz')


def test_ctrl_c_while_data_loads(tiny, tmp_path, capsys, monkeypatch):
  def interrupted(spec):
    raise KeyboardInterrupt

  monkeypatch.setattr(prepared_lib, 'prepare_uncached', interrupted)
  monkeypatch.setattr(prepared_lib, '_MEMO', {})
  refused(distill_args(tiny, tmp_path / 'run'), capsys, 'interrupted', '--resume', code=130)
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flag,value', [('--image-size', '-4'), ('--eval-test-size', '-1'),
                                        ('--seed', '-1'), ('--ipc', '0'), ('--steps', '-1'),
                                        ('--workers', '-2'), ('--reg', 'inf')])
def test_negative_values_name_the_flag(tiny, tmp_path, capsys, flag, value):
  refused(distill_args(tiny, tmp_path / 'run', flag, value), capsys, f'argument {flag}', value)
  assert not (tmp_path / 'run').exists()


def test_npz_labels_negative_or_a_class_missing(tmp_path, capsys):
  x = np.zeros((6, 8, 8), np.uint8)
  np.savez(tmp_path / 'neg.npz', x_train=x, y_train=[0, 1, -1, 0, 1, 1], x_test=x[:2],
           y_test=[0, 1])
  err = refused(distill_args(str(tmp_path / 'neg.npz'), tmp_path / 'run'), capsys,
                'negative class ids', '-1', 'relabel')
  assert '9223372036854775806' not in err
  np.savez(tmp_path / 'gap.npz', x_train=x, y_train=[0, 2, 0, 2, 0, 2], x_test=x[:2],
           y_test=[0, 2])
  err = refused(distill_args(str(tmp_path / 'gap.npz'), tmp_path / 'run', '--ipc', '1'), capsys,
                'classes [1]', 'no training images', 'Relabel')
  assert '--ipc' not in err
  assert not (tmp_path / 'run').exists()


def test_dataset_file_that_is_not_npz(tmp_path, capsys):
  import pickle
  (tmp_path / 'pickled.npz').write_bytes(pickle.dumps({'x_train': [1, 2]}))
  np.save(tmp_path / 'one.npy', np.zeros(3))
  shutil.move(tmp_path / 'one.npy', tmp_path / 'one.npz')
  for name, kind in (('pickled.npz', 'not an .npz archive'), ('one.npz', 'a .npy file')):
    err = refused(distill_args(str(tmp_path / name), tmp_path / 'run'), capsys, kind,
                  'numpy.savez')
    assert 'pickled data' not in err


def test_support_with_object_arrays_or_no_images(kip_run, tmp_path, capsys):
  np.savez(tmp_path / 'empty.npz', images=np.zeros((0, 8, 8, 1), np.float32),
           labels=np.zeros((0, 3), np.float32))
  refused(['evaluate', '--support', tmp_path / 'empty.npz', '--run', kip_run, '--transfer', ''],
          capsys, 'holds no images', 'empty support set')
  np.savez(tmp_path / 'objects.npz', images=np.array([None, 1], dtype=object))
  refused(['evaluate', '--support', tmp_path / 'objects.npz', '--transfer', ''], capsys,
          'object arrays', 'plain numeric arrays')


def test_ray_address_hint_names_our_flag(monkeypatch):
  from ntkdd.launch import ray_cluster as ray_launch

  class FakeRay:
    @staticmethod
    def is_initialized():
      return False

    @staticmethod
    def init(**kwargs):
      raise ConnectionError('Could not find any running Ray instance. Please specify the one to '
                            'connect to by setting `--address` flag or `RAY_ADDRESS` '
                            'environment variable.')

  monkeypatch.setattr(ray_launch, 'import_ray', lambda: FakeRay)
  monkeypatch.setattr(ray_launch, 'use_token_if_available', lambda address: None)
  with pytest.raises(ConnectionError) as caught:
    ray_launch.connect('auto')
  assert '`--address`' not in str(caught.value)
  assert '--ray-address' in str(caught.value) and 'ray start --head' in str(caught.value)
