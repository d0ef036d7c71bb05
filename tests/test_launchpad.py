"""The Launchpad launch type (local_mp): same results as in-process, status RPC, faults, resume.

Every program runs under a launcher process in its own process group, which each test ends
(SIGTERM, then SIGKILL of the group, by its id) in a `finally`; every wait has a timeout.
All addresses are localhost.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.lp

if sys.version_info < (3, 11):   # .venv-lp: Launchpad must import, a failure is an error
  import launchpad as lp  # noqa: F401
else:                            # Launchpad exists for Python <= 3.10 only
  lp = pytest.importorskip('launchpad', reason='Launchpad lives in .venv-lp (Python 3.10)')

from ntkdd.launch import inprocess, launchpad_program as lpp  # noqa: E402
from ntkdd.server import status  # noqa: E402
from run_helpers import BLOCK, TIMEOUT_S, wait_for  # noqa: E402
from run_helpers import assert_same_support as _assert_same_support  # noqa: E402
from run_helpers import last_step as _last_step, steps as _steps  # noqa: E402
from run_helpers import run_inprocess as _inprocess, tiny_cfg as _cfg  # noqa: E402


def _wait_for(predicate, timeout_s, what, program=None):
  if program is None:
    return wait_for(predicate, timeout_s, what)
  return wait_for(predicate, timeout_s, what, running=program.running, details=program.log_tail)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:  # a zombie child of the launcher counts as gone
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] != 'Z'
  except OSError:
    return False


def _assert_all_gone(program):
  info = json.loads(program.processes_file.read_text())
  pids = [info['launcher']] + [p for pids in info['nodes'].values() for p in pids]
  _wait_for(lambda: not any(_alive(p) for p in pids), 30, 'every program process to end')


def test_local_mp_matches_inprocess(tiny_npz, tmp_path):
  cfg = _cfg(tiny_npz)
  _inprocess(cfg, tmp_path / 'inprocess')
  start = time.time()
  program = lpp.start_local_mp(cfg, str(tmp_path / 'lp'), workers=2, block=BLOCK,
                               deadline_s=60)
  try:
    result = lpp.wait_for_result(program, str(tmp_path / 'lp'), timeout_s=TIMEOUT_S)
  finally:
    program.stop()
  print(f'local_mp run: {time.time() - start:.1f} s')
  assert result['ok'], result
  assert result['summary']['steps'] == 4
  _assert_same_support(tmp_path / 'inprocess', tmp_path / 'lp')
  # Each worker loaded the dataset itself: targets and test images went as indices.
  backend = result['backend']
  assert backend['index_blocks'] > 0 and backend['pixel_fallback_blocks'] == 0, backend
  assert all(len(w['datasets']) == 2 for w in backend['workers'])
  assert _steps(tmp_path / 'lp') == list(range(5))
  address = (tmp_path / 'lp' / 'coordinator_address.txt').read_text().strip()
  assert address.startswith('localhost:')
  info = json.loads(program.processes_file.read_text())
  assert len(info['nodes']['workers']) == 2 and len(info['nodes']['coordinator']) == 1
  assert all(a.startswith('localhost:') for addrs in info['addresses'].values() for a in addrs)
  _assert_all_gone(program)


def test_run_local_mp_returns_the_summary(tiny_npz, tmp_path):
  summary = lpp.run_local_mp(_cfg(tiny_npz, steps=2), str(tmp_path / 'run'), workers=1,
                             block=BLOCK, timeout_s=TIMEOUT_S, deadline_s=60)
  assert summary['steps'] == 2 and (tmp_path / 'run' / 'summary.json').exists()
  with pytest.raises(ValueError, match='already holds a run'):
    lpp.run_local_mp(_cfg(tiny_npz, steps=2), str(tmp_path / 'run'), workers=1)


def test_status_query_from_another_process(tiny_npz, tmp_path):
  run = tmp_path / 'run'
  cfg = _cfg(tiny_npz, steps=300, eval_every=100, checkpoint_every=100)
  program = lpp.start_local_mp(cfg, str(run), workers=2, block=BLOCK, deadline_s=60)
  try:
    _wait_for(lambda: _last_step(run) >= 1, TIMEOUT_S, 'step 1', program)
    address = (run / 'coordinator_address.txt').read_text().strip()
    code = ('import json, sys; from ntkdd.server import status; '
            'print(json.dumps(status.query_status(sys.argv[1], timeout_s=20)))')
    start = time.time()
    out = subprocess.run([sys.executable, '-c', code, address], capture_output=True,
                         text=True, timeout=60)
    print(f'status query process: {time.time() - start:.1f} s')
    assert out.returncode == 0, out.stderr[-3000:]
    snap = json.loads(out.stdout.strip().splitlines()[-1])
    assert snap['phase'] == 'running', snap
    assert 1 <= snap['step'] < 300 and snap['total_steps'] == 300
    assert snap['loss'] is not None and snap['initial_accuracy'] is not None
    assert len(snap['workers']) == 2 and snap['alive_workers'] == 2
    assert all(w['blocks_done'] >= 1 for w in snap['workers'])
    assert snap['coordinator_pid'] == json.loads(program.processes_file.read_text())[
        'nodes']['coordinator'][0]
    table = status.format_status(snap)
    assert 'step' in table and '/300' in table and 'workers: 2' in table
    # The in-process client too, and by run directory.
    assert status.query_status(str(run), timeout_s=20)['step'] >= snap['step']
  finally:
    program.stop()
  _assert_all_gone(program)
  # The coordinator checkpointed on the launcher's SIGTERM and says so.
  result = json.loads((run / 'coordinator_result.json').read_text())
  assert result['interrupted'] and not result['ok']


def test_a_killed_worker_does_not_stop_the_run(tiny_npz, tmp_path):
  cfg = _cfg(tiny_npz, steps=12, eval_every=4, checkpoint_every=4)
  _inprocess(cfg, tmp_path / 'inprocess')
  run = tmp_path / 'lp'
  program = lpp.start_local_mp(cfg, str(run), workers=2, block=BLOCK, deadline_s=60,
                               coordinator_kwargs={'retry_backoff_s': 0.5})
  try:
    pids = _wait_for(lambda: (run / 'worker_pids.json').exists() and json.loads(
        (run / 'worker_pids.json').read_text()), TIMEOUT_S, 'worker pids', program)
    _wait_for(lambda: _last_step(run) >= 2, TIMEOUT_S, 'step 2', program)
    victim = int(pids['workers']['1'])
    assert victim in json.loads(program.processes_file.read_text())['nodes']['workers']
    os.kill(victim, signal.SIGKILL)
    killed_at = _last_step(run)
    assert killed_at < 12, 'the run finished before the worker was killed'
    result = lpp.wait_for_result(program, str(run), timeout_s=TIMEOUT_S)
  finally:
    program.stop()
  assert result['ok'], result
  assert _steps(run) == list(range(13))
  _assert_same_support(tmp_path / 'inprocess', run)
  _assert_all_gone(program)


def test_a_killed_coordinator_resumes_exactly(tiny_npz, tmp_path):
  cfg = _cfg(tiny_npz, steps=12, eval_every=4, checkpoint_every=2)
  _inprocess(cfg, tmp_path / 'inprocess')
  run = tmp_path / 'lp'
  program = lpp.start_local_mp(cfg, str(run), workers=2, block=BLOCK, deadline_s=60)
  try:
    _wait_for(lambda: _last_step(run) >= 3, TIMEOUT_S, 'step 3', program)
    coordinator = json.loads(program.processes_file.read_text())['nodes']['coordinator'][0]
    os.kill(coordinator, signal.SIGKILL)
    killed_at = _last_step(run)
    assert killed_at < 12, 'the run finished before the coordinator was killed'
    with pytest.raises(lpp.CoordinatorFailed, match='without a result'):
      lpp.wait_for_result(program, str(run), timeout_s=TIMEOUT_S)
  finally:
    program.stop()
  _assert_all_gone(program)
  assert not (run / 'summary.json').exists()
  summary = lpp.run_local_mp(cfg, str(run), workers=2, resume=True, block=BLOCK,
                             timeout_s=TIMEOUT_S, deadline_s=60)
  assert summary['steps'] == 12
  assert _steps(run) == list(range(13))   # each step exactly once
  _assert_same_support(tmp_path / 'inprocess', run)


def test_kernel_local_mp_matches_inprocess():
  from ntkdd.common import architectures
  arch = architectures.Architecture('fc', 1, 2 ** 0.5, 0.1)
  rng = np.random.default_rng(0)
  x1, x2 = rng.normal(size=(20, 12)).astype(np.float32), rng.normal(size=(9, 12)).astype(
      np.float32)
  out = lpp.kernel_local_mp(arch, x1, x2, workers=2, block=BLOCK, startup_timeout_s=120)
  with inprocess.make_inprocess_backend(arch, workers=1, block=BLOCK) as backend:
    want = backend.kernel(x1, x2)
  for name in ('ntk', 'nngp'):
    np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-6)
