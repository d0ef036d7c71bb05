"""Property-style: random flag values, in and outside their ranges, fed to `ntkdd distill`,
`kernel` and `evaluate` (in-process, a fixed seed, a bounded number of quick invocations).

Each flag's value is drawn from a list of values inside its range and a list outside it; the
test knows which is which, so it asserts more than "no traceback": with every value inside
its range the command succeeds and writes only finite numbers; with any outside it is refused
(exit 2) by a message naming one of the bad flags, and writes nothing.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_npz
from ntkdd.launch import cli

SIDE, CLASSES, PER_CLASS = 8, 3, 12   # the tiny set: 36 train images of 8x8x1


def _deepest(side: int) -> int:
  """The most 2x2 pools a side allows (each needs a side >= 2)."""
  pools = 0
  while side >= 2:
    side //= 2
    pools += 1
  return pools


def _choose(rng, spec: dict) -> dict:
  """flag -> (value, in range?) for `spec` (flag -> (values in range, values outside)): about
  half the cases all in range, the others with one or two flags outside."""
  n_bad = rng.choice([0, 0, 1, 2])
  can_be_bad = [flag for flag, (_, bad) in spec.items() if bad]
  bad_flags = set(rng.choice(can_be_bad, size=min(n_bad, len(can_be_bad)), replace=False))
  chosen = {}
  for flag, (good, bad) in spec.items():
    values = bad if flag in bad_flags else good
    chosen[flag] = (values[rng.integers(len(values))], flag not in bad_flags)
  return chosen


def _finite_everywhere(value) -> bool:
  if isinstance(value, dict):
    return all(_finite_everywhere(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return all(_finite_everywhere(v) for v in value)
  if isinstance(value, float):
    return math.isfinite(value)
  return True


def _npz_finite(path: Path) -> bool:
  with np.load(path, allow_pickle=False) as f:
    return all(np.all(np.isfinite(f[k])) for k in f.files if np.issubdtype(f[k].dtype, np.number))


def _check(argv, bad_flags, written, capsys) -> int:
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert 'Traceback' not in out + err, (argv, err)
  if bad_flags:
    assert code == 2, (argv, bad_flags, out, err)
    assert any(flag.lstrip('-') in err for flag in bad_flags), (bad_flags, err)
    assert not any(Path(p).exists() for p in written), (argv, err)
  else:
    assert code == 0, (argv, err)
  return code


def _distill_case(rng, tiny, out):
  """argv and the flags drawn outside their (flag- or data-given) ranges."""
  algorithm = ['kip', 'ls'][rng.integers(2)]
  # The ConvNet with LS only: KIP's ConvNet vjp takes a minute to compile on a busy CPU (the
  # depth check, which refuses before computing, is the same for both).
  arch = ['fc', 'convnet'][rng.integers(2)] if algorithm == 'ls' else 'fc'
  image_size = [None, '8', '4'][rng.integers(3)]
  deepest = _deepest(SIDE if image_size is None else int(image_size))
  spec = {
      '--ipc': (['1', '2'], ['0', '-1', str(PER_CLASS + 1)]),
      '--steps': (['0', '1', '2'], ['-1']),
      '--tile': ([None, '1', '5'], ['0', '-3']),
      '--lr': ([None, '0.001', '0.05'], ['0', '-1', 'nan']),
      '--reg': (['1e-6', '0.01'], ['0', '-1e-6']),
      '--seed': (['0', '5', str(2 ** 32 - 1)], ['-1', str(2 ** 32)]),
      '--checkpoint-every': (['1', '3'], ['0', '-2']),
      '--eval-test-size': (['0', '5', '100'], ['-1']),
      '--image-size': ([image_size], ['0', '-4', '3']),
      '--depth': (([str(d) for d in range(min(deepest, 2) + 1)], [str(deepest + 1), '-1'])
                  if arch == 'convnet' else (['1', '2'], ['0', '-1'])),
      # KIP only: LS uses neither, so their values outside KIP's range pass with LS.
      '--target-batch': (['3', '12', str(CLASSES * PER_CLASS)],
                         [str(CLASSES * PER_CLASS + 1), '1000', '0'] if algorithm == 'kip'
                         else ['0']),
      '--eval-every': (['1', '2'], ['0', '-1'] if algorithm == 'kip' else ['-1']),
  }
  if algorithm == 'ls':   # flags LS does not use are refused as such (tested in test_cli)
    for flag in ('--steps', '--lr', '--checkpoint-every', '--eval-every', '--target-batch'):
      del spec[flag]
  chosen = _choose(rng, spec)
  argv = ['distill', '--algorithm', algorithm, '--arch', arch, '--dataset', tiny, '--data-dir',
          '.', '--no-progress', '--out', out]
  if rng.uniform() < 0.3:
    argv += ['--workers', '2', '--block', '4']
  for flag, (value, _) in chosen.items():
    if value is not None:
      argv += [flag, value]
  bad = [flag for flag, (_, ok) in chosen.items() if not ok]
  return argv, bad


def test_distill_random_flags(tmp_path, capsys):
  tiny = str(make_tiny_npz(tmp_path / 'tiny.npz'))
  rng = np.random.default_rng(1484)   # its 12 draws include a too-deep ConvNet and a
  # --target-batch larger than a class allows (refusals that depend on the data)
  outcomes = []
  for i in range(12):
    out = tmp_path / f'run{i}'
    argv, bad = _distill_case(rng, tiny, out)
    code = _check(argv, bad, [out], capsys)
    outcomes.append(code)
    if code == 0:
      assert _npz_finite(out / 'support.npz')
      for line in (out / 'metrics.jsonl').read_text().splitlines():
        assert _finite_everywhere(json.loads(line)), line
      assert _finite_everywhere(json.loads((out / 'summary.json').read_text()))
  assert 0 in outcomes and 2 in outcomes   # the draw exercised both sides


def test_kernel_random_flags(tmp_path, capsys):
  rng = np.random.default_rng(1415)
  inputs = {'good': np.random.default_rng(0).uniform(size=(4, SIDE, SIDE, 1)).astype(np.float32),
            'nan': np.full((2, SIDE, SIDE, 1), np.nan, np.float32),
            'empty': np.zeros((0, SIDE, SIDE, 1), np.float32)}
  for name, x in inputs.items():
    np.save(tmp_path / f'{name}.npy', x)
  outcomes = []
  for i in range(8):
    arch = ['fc', 'convnet'][rng.integers(2)]
    chosen = _choose(rng, {
        '--x1': (['good'], ['nan', 'empty']),
        '--tile': ([None, '1', '3'], ['0', '-3']),
        '--w-std': (['0.5', '1.4'], ['0', '-1', 'inf']),
        '--b-std': (['0', '0.1'], ['-0.1']),
        '--depth': (['0', '1', '3'], ['4', '-1']) if arch == 'convnet' else (['1', '2'],
                                                                           ['0', '-1']),
        '--workers': (['0', '2'], ['-1']),
    })
    out = tmp_path / f'k{i}.npz'
    argv = ['kernel', '--arch', arch, '--out', out]
    for flag, (value, _) in chosen.items():
      if value is not None:
        argv += [flag, tmp_path / f'{value}.npy' if flag == '--x1' else value]
    if chosen['--workers'][0] == '2':   # --block only where workers use it (else refused)
      argv += ['--block', '2']
    bad = [flag if flag != '--x1' else 'x1' for flag, (_, ok) in chosen.items() if not ok]
    code = _check(argv, bad, [out], capsys)
    outcomes.append(code)
    if code == 0:
      assert _npz_finite(out)
  assert 0 in outcomes and 2 in outcomes


def test_evaluate_random_flags(tmp_path, capsys):
  tiny = str(make_tiny_npz(tmp_path / 'tiny.npz'))
  run = tmp_path / 'run'
  assert cli.main(['distill', '--dataset', tiny, '--data-dir', '.', '--ipc', '2', '--steps', '1',
                   '--target-batch', '12', '--eval-every', '1', '--no-progress',
                   '--out', str(run)]) == 0
  capsys.readouterr()
  np.save(tmp_path / 'support.npy', np.zeros((3, SIDE, SIDE, 1), np.float32))
  supports = {'good': run / 'support.npz', 'dir': run, 'npy': tmp_path / 'support.npy',
              'missing': tmp_path / 'nope.npz'}
  rng = np.random.default_rng(1416)
  outcomes = []
  for i in range(6):
    chosen = _choose(rng, {
        '--support': (['good'], ['dir', 'npy', 'missing']),
        '--reg': (['1e-6', '0.1'], ['0', '-1']),
        '--tile': ([None, '2'], ['0']),
        '--train-lr': ([None, '0.001'], ['0', 'nan']),
        '--seeds': (['1'], ['0']),
        '--width': (['8'], ['0']),
        '--train-steps': (['3'], ['0', '-5']),
    })
    out = tmp_path / f'eval{i}.json'
    argv = ['evaluate', '--out', out, '--transfer', ['', 'fc'][rng.integers(2)]]
    for flag, (value, _) in chosen.items():
      if value is not None:
        argv += [flag, supports[value] if flag == '--support' else value]
    bad = [flag for flag, (_, ok) in chosen.items() if not ok]
    code = _check(argv, bad, [out], capsys)
    outcomes.append(code)
    if code == 0:
      report = json.loads(out.read_text())
      assert _finite_everywhere(report), report
  assert 0 in outcomes and 2 in outcomes
