"""RCIG on the Launchpad coordinator: same run as in-process, KRR from the workers, status, resume.

The coordinator node runs `rcig_loop.run_rcig` (the in-process code) and its two kernel
workers serve the ConvNet NTK of the KRR evaluation. The runs are tiny (width 8, depth 1,
3-step solves); every program is ended by its launcher's process group id in a `finally`.
"""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.lp

lp = pytest.importorskip('launchpad')
needs_optax = pytest.mark.skipif(importlib.util.find_spec('optax') is None,
                                 reason='RCIG needs optax: make venv-lp installs optax==0.1.7')

from ntkdd.launch import launchpad_program as lpp  # noqa: E402
from ntkdd.launch import status_client  # noqa: E402
from run_helpers import BLOCK, TIMEOUT_S, kill_coordinator, wait_for  # noqa: E402
from run_helpers import assert_same_support, last_step, metrics, steps  # noqa: E402
from run_helpers import run_rcig_inprocess, tiny_rcig_job  # noqa: E402


def _assert_same_run(reference, run):
  """Same support, and the same record at each step: losses, finite-net and KRR accuracies."""
  assert_same_support(reference, run)
  ref, got = metrics(reference), metrics(run)
  assert [r['step'] for r in got] == [r['step'] for r in ref]
  for key in ('loss', 'target_accuracy', 'test_accuracy', 'krr_test_accuracy', 'pool_model'):
    assert [r.get(key) for r in got] == [r.get(key) for r in ref], key


@needs_optax
def test_rcig_local_mp_matches_inprocess_with_krr_from_the_workers(tiny_npz, tmp_path):
  job = tiny_rcig_job(tiny_npz)
  reference = run_rcig_inprocess(job, tmp_path / 'inprocess')
  run = tmp_path / 'lp'
  program = lpp.start_local_mp(job, str(run), workers=2, block=BLOCK, deadline_s=60)
  try:
    result = lpp.wait_for_result(program, str(run), timeout_s=TIMEOUT_S)
  finally:
    program.stop()
  assert result['ok'], result
  summary = result['summary']
  assert summary['algorithm'] == 'rcig' and summary['steps'] == 4
  assert summary['krr_test_accuracy_after'] == reference['krr_test_accuracy_after']
  assert summary['test_accuracy_after'] == reference['test_accuracy_after']
  _assert_same_run(tmp_path / 'inprocess', run)
  # KRR accuracy at steps 0, 2 and 4 (--eval-every 2), from kernel blocks the workers computed.
  krr = [(r['step'], r['krr_test_accuracy']) for r in metrics(run) if 'krr_test_accuracy' in r]
  assert [s for s, _ in krr] == [0, 2, 4] and all(0 <= a <= 1 for _, a in krr)
  backend = result['backend']
  assert all(w['blocks_done'] > 0 for w in backend['workers']), backend
  assert backend['index_blocks'] > 0   # test rows went as indices: the workers hold the data
  config = json.loads((run / 'config.json').read_text())['flags']
  assert config['algorithm'] == 'rcig' and config['krr_kernel'] == 'ntk'
  assert config['krr_arch']['name'] == 'convnet' and config['krr_arch']['depth'] == 1
  # Status after the end: the coordinator's final snapshot, with both accuracies.
  snap = status_client.query_status(str(run))
  assert snap['source'] == 'snapshot' and snap['phase'] == 'done' and snap['step'] == 4
  assert snap['algorithm'] == 'rcig' and snap['total_steps'] == 4
  assert snap['last_accuracy'] == reference['test_accuracy_after']
  assert snap['last_krr_accuracy'] == reference['krr_test_accuracy_after']
  assert len(snap['workers']) == 2


@needs_optax
def test_rcig_killed_coordinator_resumes_exactly(tiny_npz, tmp_path):
  # A run far longer than the test: the coordinator is killed early, then resumed to a step
  # count past the kill (--steps may change on resume), which must equal that many steps in
  # one go. The count is chosen after the kill: tiny steps are fast, and how far the run got
  # during the status checks depends on the machine.
  long_job = tiny_rcig_job(tiny_npz, steps=100000, eval_every=12, checkpoint_every=2)
  run = tmp_path / 'lp'
  program = lpp.start_local_mp(long_job, str(run), workers=2, block=BLOCK, deadline_s=60)
  try:
    wait_for(lambda: last_step(run) >= 3, TIMEOUT_S, 'step 3', running=program.running,
             details=program.log_tail)
    # Status while it runs: the coordinator's Unix socket, and `ntkdd status` from the host.
    live = status_client.query_status(str(run))
    assert live['source'] == 'socket' and live['phase'] == 'running', live
    assert live['algorithm'] == 'rcig' and live['total_steps'] == 100000
    assert live['step'] >= 3 and len(live['workers']) == 2
    assert live['last_krr_accuracy'] is not None   # step 0's evaluation
    out = subprocess.run([sys.executable, '-m', 'ntkdd.launch.cli', 'status', str(run)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'NN test acc' in out.stdout and 'KRR test acc' in out.stdout
    assert 'status.sock (live)' in out.stdout
    coordinator = kill_coordinator(program, run, 100000, TIMEOUT_S)['nodes']['coordinator'][0]
  finally:
    program.stop()
  assert not (run / 'summary.json').exists()
  snap = status_client.query_status(str(run))
  assert snap['source'] == 'snapshot' and snap['phase'] == 'crashed', snap
  assert str(coordinator) in snap['error']
  total = max(24, 12 * (last_step(run) // 12 + 2))   # past the kill, a multiple of eval_every
  job = tiny_rcig_job(tiny_npz, steps=total, eval_every=12, checkpoint_every=2)
  run_rcig_inprocess(job, tmp_path / 'inprocess')
  summary = lpp.run_local_mp(job, str(run), workers=2, resume=True, block=BLOCK,
                             timeout_s=TIMEOUT_S, deadline_s=60)
  assert summary['steps'] == total
  assert steps(run) == list(range(total + 1))   # each step exactly once
  _assert_same_run(tmp_path / 'inprocess', run)
  np.testing.assert_array_equal(  # the saved support (the EMA) bit for bit
      np.load(run / 'support.npz')['images'],
      np.load(tmp_path / 'inprocess' / 'support.npz')['images'])
  assert status_client.query_status(str(run))['phase'] == 'done'


def test_rcig_without_optax_is_refused_before_anything_starts(tiny_npz, tmp_path,
                                                              monkeypatch):
  monkeypatch.setitem(sys.modules, 'optax', None)   # `import optax` raises ImportError
  with pytest.raises(ImportError, match=r'optax==0.1.7'):
    lpp.start_local_mp(tiny_rcig_job(tiny_npz), str(tmp_path / 'run'), workers=2)
  assert not (tmp_path / 'run').exists()


@needs_optax
def test_rcig_from_the_command_line(tiny_npz, tmp_path, capsys):
  """`ntkdd distill --algorithm rcig --launch launchpad --workers 2` end to end."""
  from ntkdd.launch import cli
  run = tmp_path / 'cli'
  code = cli.main(['distill', '--algorithm', 'rcig', '--dataset', tiny_npz, '--data-dir', '.',
                   '--ipc', '1', '--steps', '2', '--depth', '1', '--width', '8', '--pool-size',
                   '2', '--inner-steps', '2', '--hinv-steps', '2', '--rcig-target-batch', '12',
                   '--eval-every', '2', '--eval-test-size', '12', '--launch', 'launchpad',
                   '--workers', '2', '--block', str(BLOCK), '--out', str(run)])
  out = capsys.readouterr().out
  assert code == 0
  assert 'finite ConvNet test accuracy' in out and 'KRR test accuracy (ConvNet NTK)' in out
  assert [r['step'] for r in metrics(run) if 'krr_test_accuracy' in r] == [0, 2]
  result = json.loads((run / 'coordinator_result.json').read_text())
  assert result['ok'] and result['summary']['algorithm'] == 'rcig'
  flags = json.loads((run / 'config.json').read_text())['flags']
  assert flags['depth'] == 1 and flags['width'] == 8 and flags['krr_arch']['depth'] == 1
  out = subprocess.run([sys.executable, '-m', 'ntkdd.launch.cli', 'status', str(run)],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and 'KRR test acc' in out.stdout and 'done' in out.stdout
