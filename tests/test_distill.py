"""KIP and LS end to end on tiny data: learning, reproducibility, resume, bad input."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_tiny_npz
from ntkdd.common import kip
from ntkdd.launch import status_client
from ntkdd.server import backend, checkpoint, distill
from ntkdd.server import run_dir as run_dir_lib


@pytest.fixture
def hard_npz(tmp_path):
  """10 classes of 2x2 images, patterns plus noise: one real image per class with one-hot labels
  scores only ~50% on its 200 test images, so better support sets can show it."""
  return str(make_tiny_npz(tmp_path / 'hard.npz', classes=10, per_class=12, test_per_class=20,
                           side=2))


def _cfg(tiny_npz, **kw):
  base = dict(algorithm='kip', dataset=tiny_npz, data_dir='.', ipc=2, steps=6, arch='fc', depth=1,
              target_batch=12, eval_every=3, checkpoint_every=2, learning_rate=0.05, seed=3)
  base.update(kw)
  return distill.DistillConfig(**base)


def _factory(cfg):
  return lambda arch: backend.InProcessKernels(arch, dtype='float32')


def _run(cfg, out, resume=False):
  return distill.distill(cfg, str(out), _factory(cfg), resume=resume, progress=False)


def _support(out):
  with np.load(out / 'support.npz') as f:
    return {k: f[k] for k in f.files}


def test_kip_lowers_loss_and_writes_the_run_directory(tiny_npz, tmp_path):
  cfg = _cfg(tiny_npz, steps=30, eval_every=10, learn_labels=True)
  _run(cfg, tmp_path / 'run')
  records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in records if r['loss'] is not None]
  assert len(losses) == 30 and [r['step'] for r in records] == list(range(31))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  support = _support(tmp_path / 'run')
  assert support['images'].shape == (6, 8, 8, 1) and support['labels'].shape == (6, 3)
  assert 0 <= support['images_pixels'].min() and support['images_pixels'].max() <= 1
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert config['flags']['ipc'] == 2 and config['dataset']['checksum']


def test_same_seed_same_result_and_resume_is_exact(tiny_npz, tmp_path):
  straight = tmp_path / 'straight'
  _run(_cfg(tiny_npz), straight)
  again = tmp_path / 'again'
  _run(_cfg(tiny_npz), again)
  np.testing.assert_array_equal(_support(straight)['images'], _support(again)['images'])
  # Stop after 4 steps (a checkpoint), then resume to 6.
  split = tmp_path / 'split'
  _run(_cfg(tiny_npz, steps=4), split)
  _run(_cfg(tiny_npz, steps=6), split, resume=True)
  np.testing.assert_array_equal(_support(straight)['images'], _support(split)['images'])
  steps = [json.loads(l)['step'] for l in (split / 'metrics.jsonl').read_text().splitlines()]
  assert steps == list(range(7))  # no step counted twice


def test_ema_saves_the_bias_corrected_average_and_resumes_exactly(tiny_npz, tmp_path):
  """--ema-decay: support.npz holds the average of the steps' sets (bias-corrected), the
  evaluations log the current set beside it, and a resumed run ends with the same bits."""
  decay = 0.8
  straight = tmp_path / 'straight'
  _run(_cfg(tiny_npz, ema_decay=decay, learn_labels=True), straight)
  # The same run without the average: its per-step sets, replayed step by step (one per run).
  sets = []
  for steps in range(1, 7):
    out = tmp_path / f'plain{steps}'
    _run(_cfg(tiny_npz, steps=steps, learn_labels=True), out)
    sets.append(_support(out))
  for key in ('images', 'labels'):
    average = np.zeros_like(sets[0][key])
    for s in sets:
      average = decay * average + (1 - decay) * s[key]
    np.testing.assert_allclose(_support(straight)[key], average / (1 - decay ** 6), rtol=1e-6)
    assert not np.allclose(_support(straight)[key], sets[-1][key])
  records = [json.loads(l) for l in (straight / 'metrics.jsonl').read_text().splitlines()]
  assert 'krr_test_accuracy_current' in records[3] and 'krr_test_accuracy' in records[3]
  split = tmp_path / 'split'
  _run(_cfg(tiny_npz, steps=4, ema_decay=decay, learn_labels=True), split)
  _run(_cfg(tiny_npz, steps=6, ema_decay=decay, learn_labels=True), split, resume=True)
  for key in ('images', 'labels'):
    np.testing.assert_array_equal(_support(straight)[key], _support(split)[key])
  with pytest.raises(ValueError, match='--ema-decay'):
    _cfg(tiny_npz, ema_decay=1.0).validate()


def test_platt_loss_learns_its_temperature_and_resumes_exactly(hard_npz, tmp_path):
  """--loss platt: the log temperature is learned (logged, checkpointed), KIP still raises the
  test accuracy, a resumed run ends with the same bits, and LS refuses the flag."""
  kw = dict(ipc=1, learn_labels=True, learning_rate=0.04, target_batch=120, loss='platt')
  straight = tmp_path / 'straight'
  summary = _run(_cfg(hard_npz, steps=30, eval_every=10, **kw), straight)
  records = [json.loads(l) for l in (straight / 'metrics.jsonl').read_text().splitlines()]
  temperatures = [r['temperature'] for r in records[1:]]
  assert len(temperatures) == 30 and temperatures[-1] > 1.2   # from 1: it sharpens
  assert summary['krr_test_accuracy_after'] >= summary['krr_test_accuracy_before'] + 0.1
  mse = _run(_cfg(hard_npz, steps=30, eval_every=10, **{**kw, 'loss': 'mse'}), tmp_path / 'mse')
  assert 'temperature' not in json.loads((tmp_path / 'mse' / 'metrics.jsonl').read_text()
                                         .splitlines()[1])
  assert not np.array_equal(_support(straight)['images'], _support(tmp_path / 'mse')['images'])
  assert mse['krr_test_accuracy_after'] > mse['krr_test_accuracy_before']
  split = tmp_path / 'split'
  _run(_cfg(hard_npz, steps=16, eval_every=10, **kw), split)
  with np.load(split / 'checkpoint.npz') as f:
    assert f[distill.PLATT_TEMPERATURE].shape == () and 'opt/mu/log_temperature' in f.files
  _run(_cfg(hard_npz, steps=30, eval_every=10, **kw), split, resume=True)
  for key in ('images', 'labels'):
    np.testing.assert_array_equal(_support(straight)[key], _support(split)[key])
  # support.npz keeps the temperature; a run started from the set goes on at it.
  saved = _support(straight)
  assert np.isclose(saved['log_temp'], np.log(temperatures[-1]), rtol=1e-6, atol=0)
  assert 'log_temp' not in _support(tmp_path / 'mse')
  start = tmp_path / 'start.npz'
  np.savez(start, **saved)
  _run(_cfg(hard_npz, steps=1, eval_every=10, init_support=str(start), **kw), tmp_path / 'go-on')
  first = json.loads((tmp_path / 'go-on' / 'metrics.jsonl').read_text().splitlines()[1])
  assert abs(np.log(first['temperature']) - saved['log_temp']) < 0.05   # one Adam step away
  with pytest.raises(ValueError, match='--loss platt is a KIP setting'):
    _cfg(hard_npz, algorithm='ls', loss='platt').validate()
  with pytest.raises(ValueError, match='--loss must be one of'):
    _cfg(hard_npz, loss='hinge').validate()


def test_platt_loss_takes_the_two_rounds_on_a_fused_backend():
  """The fused step computes the squared error only: with the Platt loss kip_gradients runs
  the kernel and vjp rounds, and gets what a plain backend gets."""
  rng = np.random.default_rng(0)
  support, targets = rng.normal(size=(3, 8)), rng.normal(size=(6, 8))
  y_s = np.eye(3) - 1 / 3
  ids = np.arange(6) % 3
  y_t = np.eye(3)[ids] - 1 / 3
  plain = backend.InProcessKernels(distill.DistillConfig().architecture(), dtype='float64')
  fused = backend.InProcessKernels(distill.DistillConfig().architecture(), dtype='float64')
  fused.fused_step = True
  fused.kip_step = lambda *a, **k: pytest.fail('the fused step ran for the Platt loss')
  got = kip.kip_gradients(fused, support, y_s, targets, y_t, ids, loss='platt',
                          log_temperature=0.5)
  want = kip.kip_gradients(plain, support, y_s, targets, y_t, ids, loss='platt',
                           log_temperature=0.5)
  np.testing.assert_array_equal(got.grad_images, want.grad_images)
  assert got.grad_log_temperature == want.grad_log_temperature != 0


def test_resume_after_crash_drops_metrics_past_the_checkpoint(tiny_npz, tmp_path):
  out = tmp_path / 'run'
  _run(_cfg(tiny_npz, steps=4), out)
  # A crash after step 5 was logged but before its checkpoint.
  run_dir_lib.append_metrics(out / 'metrics.jsonl', {'step': 5, 'loss': 1.0})
  with open(out / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "lo')  # torn line
  _run(_cfg(tiny_npz, steps=6), out, resume=True)
  steps = [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
  assert steps == list(range(7))


def test_resume_refuses_changed_flags_and_fresh_run_refuses_existing(tiny_npz, tmp_path):
  out = tmp_path / 'run'
  _run(_cfg(tiny_npz, steps=2), out)
  with pytest.raises(ValueError, match='--resume'):
    _run(_cfg(tiny_npz, steps=2), out)
  with pytest.raises(ValueError, match='flag learning_rate'):
    _run(_cfg(tiny_npz, steps=4, learning_rate=0.5), out, resume=True)


def test_kip_raises_test_accuracy(hard_npz, tmp_path):
  cfg = _cfg(hard_npz, ipc=1, steps=30, eval_every=10, learn_labels=True, learning_rate=0.04,
             target_batch=120)
  summary = _run(cfg, tmp_path / 'kip')
  # Measured: 0.52 -> 0.765 (0.47 -> 0.69 and 0.46 -> 0.64 on data of seeds 1 and 2).
  assert summary['krr_test_accuracy_before'] < 0.7
  assert summary['krr_test_accuracy_after'] >= summary['krr_test_accuracy_before'] + 0.1


def test_label_solve_beats_one_hot_labels(hard_npz, tmp_path):
  cfg = _cfg(hard_npz, algorithm='ls', ipc=1, reg=1e-3)
  summary = _run(cfg, tmp_path / 'ls')
  support = _support(tmp_path / 'ls')
  assert support['labels'].shape == (10, 10)
  # The solved labels are no longer one-hot minus 1/C.
  assert not np.allclose(support['labels'], support['labels'].round(3))
  # Measured: 0.52 -> 0.72 (0.47 -> 0.665 and 0.46 -> 0.64 on data of seeds 1 and 2).
  assert summary['krr_test_accuracy_before'] < 0.7
  assert summary['krr_test_accuracy_after'] >= summary['krr_test_accuracy_before'] + 0.1


def test_label_solve_reports_its_whole_run_in_kernel_pairs(hard_npz, tmp_path):
  # A run without steps: `ntkdd status` has its progress and ETA from the kernel pairs of the
  # whole solve (K_ss, K(support, targets), then K_ss and K(support, test) for the accuracies).
  from ntkdd.server import status
  cfg = _cfg(hard_npz, algorithm='ls', ipc=1, reg=1e-3, eval_test_size=30)
  holder = status.RunStatus(str(tmp_path / 'ls'))
  seen = []
  holder.update = lambda **fields: seen.append(fields)
  distill.distill(cfg, str(tmp_path / 'ls'), _factory(cfg), progress=False, run_status=holder)
  runs = [f['run_progress'] for f in seen if 'run_progress' in f]
  states = [s for s in runs if s is not None]
  n_train = len(np.load(hard_npz)['y_train'])
  assert states[-1]['what'] == 'Label Solve'
  assert states[-1]['pairs_total'] == 10 * (2 * 10 + n_train + 30)
  done = [s['pairs_done'] for s in states]
  assert done == sorted(done) and done[-1] == states[-1]['pairs_total'] and len(done) >= 4
  assert runs[-1] is None      # cleared at the end
  # While a run goes, the status snapshot takes its ETA from it.
  holder = status.RunStatus()
  holder.set_phase('running')
  holder.update(run_progress=dict(states[1], eta_s=42.0))
  snap = holder.snapshot()
  assert snap['eta_s'] == 42.0
  assert 'Label Solve: ' in status_client.format_status(snap)


@pytest.mark.parametrize('kw,message', [
    (dict(ipc=50), 'exceeds the smallest class'),
    (dict(reg=0.0), 'must be > 0'),
    (dict(algorithm='magic'), 'Unknown algorithm'),
    (dict(arch='resnet'), 'Unknown architecture'),
])
def test_bad_input_names_the_fix(tiny_npz, tmp_path, kw, message):
  with pytest.raises(ValueError, match=message):
    _run(_cfg(tiny_npz, **kw), tmp_path / 'bad')


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_npz, tmp_path):
  out = tmp_path / 'run'
  cfg = _cfg(tiny_npz, steps=4, learning_rate=1e300, dtype='float32')
  with pytest.raises(FloatingPointError, match='last good checkpoint'):
    _run(cfg, out)
  arrays, meta = checkpoint.load_checkpoint(out)
  assert np.all(np.isfinite(arrays['images']))


def test_sigterm_checkpoints_and_the_cli_resumes(tiny_npz, tmp_path):
  out = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'ntkdd.launch.cli', 'distill', '--dataset', tiny_npz,
         '--data-dir', '.', '--ipc', '2', '--steps', '100000', '--target-batch', '12',
         '--checkpoint-every', '100000', '--eval-every', '100000', '--no-progress',
         '--out', str(out)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    # Wait until steps are being logged, then ask it to stop.
    import time
    deadline = time.time() + 120
    while time.time() < deadline:
      metrics = out / 'metrics.jsonl'
      if metrics.exists() and len(metrics.read_text().splitlines()) > 3:
        break
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err
  assert '--resume' in err
  arrays, meta = checkpoint.load_checkpoint(out)
  logged = [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
  assert meta['step'] == logged[-1] > 0


def test_krr_accuracies_compute_the_test_kernel_once(hard_npz):
  """LS's before and after: one pass over the test images gives both accuracies, equal to two
  separate krr_accuracy calls."""
  cfg = _cfg(hard_npz, algorithm='ls', ipc=1)
  prepared = distill.prepare_data(cfg)
  inner = backend.InProcessKernels(cfg.architecture(), dtype='float32')
  calls = []

  class Counting:
    def kernel(self, x1, x2=None):
      calls.append(len(x1) * (len(x1) if x2 is None else len(x2)))
      return inner.kernel(x1, x2)

  rng = np.random.default_rng(0)
  images = prepared.x_train[:10]
  label_sets = [rng.normal(size=(10, 10)), rng.normal(size=(10, 10))]
  x_test, ids = prepared.x_test, prepared.y_test
  both = kip.krr_accuracies(Counting(), images, label_sets, x_test, ids, chunk=64)
  pairs_once = sum(calls)
  separate = [kip.krr_accuracy(inner, images, y, x_test, ids, chunk=64) for y in label_sets]
  assert both == separate
  assert both[0] != both[1]   # the label sets differ, so must what they score
  assert pairs_once == 10 * 10 + 10 * len(x_test)


def test_init_support_starts_kip_and_ls_from_a_saved_set(tiny_npz, tmp_path):
  """--init-support: KIP's first set and LS's images are the file's, labels included; a
  resumed run reads its checkpoint, not the file (which may be gone); a set of another --ipc
  is refused by name."""
  _run(_cfg(tiny_npz, steps=4, learn_labels=True), tmp_path / 'made')
  made = _support(tmp_path / 'made')
  start = tmp_path / 'start.npz'
  np.savez(start, **made)
  zero = tmp_path / 'zero'
  _run(_cfg(tiny_npz, steps=0, learn_labels=True, init_support=str(start)), zero)
  np.testing.assert_array_equal(_support(zero)['images'], made['images'])
  np.testing.assert_array_equal(_support(zero)['labels'], made['labels'])
  np.testing.assert_array_equal(_support(zero)['label_ids'], made['label_ids'])
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  _run(_cfg(tiny_npz, steps=4, init_support=str(start)), straight)
  _run(_cfg(tiny_npz, steps=2, init_support=str(start)), split)
  start.rename(tmp_path / 'moved.npz')
  _run(_cfg(tiny_npz, steps=4, init_support=str(start)), split, resume=True)
  np.testing.assert_array_equal(_support(split)['images'], _support(straight)['images'])
  assert not np.array_equal(_support(straight)['images'], made['images'])
  ls = tmp_path / 'ls'
  _run(_cfg(tiny_npz, algorithm='ls', init_support=str(tmp_path / 'moved.npz')), ls)
  np.testing.assert_array_equal(_support(ls)['images'], made['images'])
  with pytest.raises(ValueError, match=r'--ipc 1 starts from 1 of each'):
    _run(_cfg(tiny_npz, ipc=1, init_support=str(tmp_path / 'moved.npz')), tmp_path / 'ipc1')
  assert not (tmp_path / 'ipc1' / 'checkpoint.npz').exists()
