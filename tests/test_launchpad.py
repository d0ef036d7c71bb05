"""The Launchpad launch type (local_mp): same results as in-process, status RPC, faults, resume.

Every program runs under a launcher process in its own process group, which each test ends
(SIGTERM, then SIGKILL of the group, by its id) in a `finally`; every wait has a timeout.
All addresses are localhost, inside the run's private network namespace (`unshare -n`): no
Courier port of a run is reachable from the host, whose terminals see status through the run
directory (status.sock, status.json).
"""
import errno
import json
import os
import signal
import socket
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
from ntkdd.launch import status_client  # noqa: E402
from ntkdd.server import run_dir as run_dir_lib  # noqa: E402
from ntkdd.workers import cpu_pinning  # noqa: E402
from run_helpers import BLOCK, TIMEOUT_S, kill_coordinator, wait_for  # noqa: E402
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


def _run_pids(program):
  info = json.loads(program.processes_file.read_text())
  return info, [info['launcher']] + [p for pids in info['nodes'].values() for p in pids]


def _listening_inodes(net_dir):
  """Inodes of the TCP sockets in state LISTEN in /proc/.../net/tcp and tcp6."""
  inodes = set()
  for name in ('tcp', 'tcp6'):
    try:
      lines = open(f'{net_dir}/{name}').read().splitlines()[1:]
    except OSError:
      continue
    for line in lines:
      fields = line.split()
      if fields[3] == '0A':
        inodes.add(fields[9])
  return inodes


def _socket_inodes(pid):
  inodes = set()
  try:
    for fd in os.listdir(f'/proc/{pid}/fd'):
      try:
        target = os.readlink(f'/proc/{pid}/fd/{fd}')
      except OSError:
        continue
      if target.startswith('socket:['):
        inodes.add(target[len('socket:['):-1])
  except OSError:
    pass
  return inodes


LONG_STEPS = 5000   # ~60 steps/s on a quiet machine: it never ends before the test stops it


def _start_long_run(tiny_npz, run):
  """A run over two workers, long enough to look at while it runs."""
  cfg = _cfg(tiny_npz, steps=LONG_STEPS, eval_every=500, checkpoint_every=500)
  return lpp.start_local_mp(cfg, str(run), workers=2, block=BLOCK, deadline_s=60)


def _ntkdd_status(run_dir, *flags):
  out = subprocess.run([sys.executable, '-m', 'ntkdd.launch.cli', 'status', str(run_dir),
                        *flags], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


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
  assert info['network'] == 'private' and info['netns'] != os.readlink('/proc/self/ns/net')
  assert len(info['nodes']['workers']) == 2 and len(info['nodes']['coordinator']) == 1
  assert all(a.startswith('localhost:') for addrs in info['addresses'].values() for a in addrs)
  _assert_all_gone(program)


def test_run_local_mp_returns_the_summary(tiny_npz, tmp_path):
  summary = lpp.run_local_mp(_cfg(tiny_npz, steps=2), str(tmp_path / 'run'), workers=1,
                             block=BLOCK, timeout_s=TIMEOUT_S, deadline_s=60)
  assert summary['steps'] == 2 and (tmp_path / 'run' / 'summary.json').exists()
  # The finished run's outcome comes from its run directory, not a connection error.
  snap = status_client.query_status(str(tmp_path / 'run'))
  assert snap['source'] == 'snapshot' and snap['phase'] == 'done' and snap['step'] == 2
  assert not (tmp_path / 'run' / run_dir_lib.STATUS_SOCKET).exists()
  with pytest.raises(ValueError, match='already holds a run'):
    lpp.run_local_mp(_cfg(tiny_npz, steps=2), str(tmp_path / 'run'), workers=1)


def test_status_query_from_another_process(tiny_npz, tmp_path):
  run = tmp_path / 'run'
  program = _start_long_run(tiny_npz, run)
  try:
    _wait_for(lambda: _last_step(run) >= 1, TIMEOUT_S, 'step 1', program)
    # Another process of the host: the run directory's socket (no network).
    snap = json.loads(_ntkdd_status(run, '--json'))
    assert snap['source'] == 'socket' and snap['phase'] == 'running', snap
    assert 1 <= snap['step'] < LONG_STEPS and snap['total_steps'] == LONG_STEPS
    assert snap['loss'] is not None and snap['initial_accuracy'] is not None
    assert len(snap['workers']) == 2 and snap['alive_workers'] == 2
    assert all(w['blocks_done'] >= 1 for w in snap['workers'])
    assert snap['coordinator_pid'] == json.loads(program.processes_file.read_text())[
        'nodes']['coordinator'][0]
    table = status_client.format_status(snap)
    assert 'step' in table and f'/{LONG_STEPS}' in table and 'workers: 2' in table
    table = _ntkdd_status(run)
    assert 'status.sock (live)' in table, table
    assert status_client.query_status(str(run), timeout_s=20)['step'] >= snap['step']
  finally:
    program.stop()
  _assert_all_gone(program)
  # The coordinator checkpointed on the launcher's SIGTERM and says so, and so does status.
  result = json.loads((run / 'coordinator_result.json').read_text())
  assert result['interrupted'] and not result['ok']
  after = json.loads(_ntkdd_status(run, '--json'))
  assert after['source'] == 'snapshot' and after['phase'] == 'interrupted', after
  assert after['snapshot_final'] and after['eta_s'] is None and after['ended']
  assert 'status.json, written' in _ntkdd_status(run)


def test_no_port_of_a_run_is_reachable_from_the_host(tiny_npz, tmp_path):
  run = tmp_path / 'run'
  program = _start_long_run(tiny_npz, run)
  try:
    _wait_for(lambda: _last_step(run) >= 1, TIMEOUT_S, 'step 1', program)
    info, pids = _run_pids(program)
    assert len(pids) == 4 and info['network'] == 'private'
    host_netns = os.readlink('/proc/self/ns/net')
    assert all(os.readlink(f'/proc/{pid}/ns/net') == info['netns'] != host_netns
               for pid in pids)
    host_listening = _listening_inodes('/proc/self/net')
    for pid in pids:
      assert not _socket_inodes(pid) & host_listening, f'pid {pid} listens on the host'
    # The check can fail: the coordinator and the workers do listen, inside the namespace.
    for pid in info['nodes']['coordinator'] + info['nodes']['workers']:
      assert _socket_inodes(pid) & _listening_inodes(f'/proc/{pid}/net'), pid
    ports = [int(a.rsplit(':', 1)[1]) for addrs in info['addresses'].values() for a in addrs]
    assert len(ports) == 3
    for port in ports:
      for family, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
          probe.settimeout(5)
          assert probe.connect_ex((host, port)) == errno.ECONNREFUSED, (host, port)
    # Status still reaches this (host) process, through the run directory's socket.
    snap = json.loads(_ntkdd_status(run, '--json'))
    assert snap['source'] == 'socket' and snap['alive_workers'] == 2
  finally:
    program.stop()
  _assert_all_gone(program)


def test_without_a_namespace_the_launch_is_refused_unless_exposed(tiny_npz, tmp_path,
                                                                 monkeypatch, capsys):
  from ntkdd.launch import private_network
  monkeypatch.setattr(private_network, 'inside_private_namespace', lambda: False)
  monkeypatch.setattr(private_network, 'probe_unshare',
                      lambda: (None, '`unshare -n`: Operation not permitted'))
  with pytest.raises(lpp.PrivateNetworkUnavailable) as refused:
    lpp.start_local_mp(_cfg(tiny_npz), str(tmp_path / 'run'), workers=1)
  message = str(refused.value)
  assert 'Operation not permitted' in message and lpp.EXPOSE_FLAG in message
  assert '--launch ray' in message and 'executes what' in message
  assert not (tmp_path / 'run' / run_dir_lib.LAUNCHPAD_PROCESSES).exists()
  # The command line: one message, no traceback.
  from ntkdd.launch import cli
  code = cli.main(['distill', '--dataset', tiny_npz, '--data-dir', '.', '--ipc', '2',
                   '--steps', '2', '--out', str(tmp_path / 'cli'), '--launch', 'launchpad',
                   '--workers', '1'])
  err = capsys.readouterr().err
  assert code == 2 and 'Operation not permitted' in err and lpp.EXPOSE_FLAG in err
  assert 'Traceback' not in err


def test_a_killed_worker_does_not_stop_the_run(tiny_npz, tmp_path):
  cfg = _cfg(tiny_npz, steps=12, eval_every=4, checkpoint_every=4)
  _inprocess(cfg, tmp_path / 'inprocess')
  run = tmp_path / 'lp'
  program = lpp.start_local_mp(cfg, str(run), workers=2, block=BLOCK, deadline_s=60,
                               coordinator_kwargs={'retry_backoff_s': 0.5},
                               worker_kwargs={'pin_core': True})   # --pin-workers
  try:
    pids = _wait_for(lambda: (run / 'worker_pids.json').exists() and json.loads(
        (run / 'worker_pids.json').read_text()), TIMEOUT_S, 'worker pids', program)
    # Each worker runs all its threads on its own core: worker i on the i-th allowed one.
    for index, pid in pids['workers'].items():
      core = cpu_pinning.core_for(int(index), os.sched_getaffinity(0))
      tasks = os.listdir(f'/proc/{pid}/task')
      assert tasks and all(os.sched_getaffinity(int(tid)) == {core} for tid in tasks), (index, pid)
    _wait_for(lambda: _last_step(run) >= 2, TIMEOUT_S, 'step 2', program)
    victim = int(pids['workers']['1'])
    info = json.loads(program.processes_file.read_text())
    assert victim in info['nodes']['workers'] and info['network'] == 'private'
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
    info = kill_coordinator(program, run, 12, TIMEOUT_S)
    assert info['network'] == 'private'
    coordinator = info['nodes']['coordinator'][0]
  finally:
    program.stop()
  _assert_all_gone(program)
  assert not (run / 'summary.json').exists()
  # Status says what happened: the coordinator's pid is gone and it recorded no end.
  snap = status_client.query_status(str(run))
  assert snap['source'] == 'snapshot' and snap['phase'] == 'crashed', snap
  assert str(coordinator) in snap['error'] and snap['eta_s'] is None
  summary = lpp.run_local_mp(cfg, str(run), workers=2, resume=True, block=BLOCK,
                             timeout_s=TIMEOUT_S, deadline_s=60)
  assert summary['steps'] == 12
  assert _steps(run) == list(range(13))   # each step exactly once
  _assert_same_support(tmp_path / 'inprocess', run)


def test_kernel_local_mp_matches_inprocess(tmp_path):
  """`ntkdd kernel --launch launchpad` coordinates the workers itself, so the CLI re-runs
  itself inside the private namespace; this process stays on the host."""
  from ntkdd.common import architectures
  arch = architectures.Architecture('fc', 1, 2 ** 0.5, 0.1)
  rng = np.random.default_rng(0)
  x1, x2 = rng.normal(size=(20, 12)).astype(np.float32), rng.normal(size=(9, 12)).astype(
      np.float32)
  np.save(tmp_path / 'x1.npy', x1)
  np.save(tmp_path / 'x2.npy', x2)
  with pytest.raises(lpp.PrivateNetworkUnavailable, match='coordinates'):
    lpp.kernel_local_mp(arch, x1, x2, workers=2, block=BLOCK)   # not from the host's network
  out = subprocess.run(
      [sys.executable, '-m', 'ntkdd.launch.cli', 'kernel', '--arch', 'fc', '--depth', '1',
       '--x1', str(tmp_path / 'x1.npy'), '--x2', str(tmp_path / 'x2.npy'),
       '--out', str(tmp_path / 'k.npz'), '--launch', 'launchpad', '--workers', '2',
       '--block', str(BLOCK)], capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with inprocess.make_inprocess_backend(arch, workers=1, block=BLOCK) as backend:
    want = backend.kernel(x1, x2)
  with np.load(tmp_path / 'k.npz') as got:
    for name in ('ntk', 'nngp'):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


WORKER_FUZZ = r'''
import json, struct, sys
import numpy as np
import courier
from ntkdd.common import architectures
from ntkdd.workers import protocol
from ntkdd.launch import launchpad_program as lpp

prefix = struct.Struct('<4sHI')
good = protocol.encode({'rows': np.ones((2, 6), np.float32), 'cols': np.ones((3, 6), np.float32)})
header = json.dumps({'fields': {}, 'arrays': [{'name': 'rows', 'dtype': '<f4',
                                               'shape': [2 ** 20, 2 ** 20], 'offset': 0,
                                               'nbytes': 2 ** 42}], 'data_nbytes': 2 ** 42})
blobs = [b'', b'garbage', good[:len(good) // 2], good + b'\0' * 8,
         prefix.pack(protocol.MAGIC, protocol.VERSION, 2 ** 31) + b'{}',
         prefix.pack(protocol.MAGIC, protocol.VERSION, len(header)) + header.encode(),
         np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()]
arch = architectures.Architecture('fc', 1)
with lpp.make_launchpad_backend(arch, workers=1, block=8, startup_timeout_s=120) as backend:
  client = courier.Client(backend.program.processes()['addresses']['workers'][0],
                          call_timeout=60)
  codes = [protocol.decode(client.kernel_block(blob))['error'] for blob in blobs]
  codes += [protocol.decode(client.set_images('rows', 1, blob))['error'] for blob in blobs]
  x = np.random.default_rng(1).normal(size=(10, 6)).astype(np.float32)
  ntk = backend.kernel(x)['ntk']
  served = bool(np.isfinite(ntk).all() and ntk.shape == (10, 10))
  print(json.dumps({'codes': codes, 'served': served,
                    'pong': protocol.decode(client.ping())['ok']}))
'''


def test_a_worker_process_refuses_malformed_messages_and_keeps_serving(tmp_path):
  """Over Courier, inside the private namespace (the only place its port exists)."""
  from ntkdd.launch import private_network
  from ntkdd.workers import protocol
  prefix, why = private_network.probe_unshare()
  assert prefix is not None, why
  done = private_network.run([sys.executable, '-c', WORKER_FUZZ], prefix, timeout_s=TIMEOUT_S,
                             cwd=str(tmp_path))
  assert done.returncode == 0, done.output[-6000:]
  answer = json.loads(done.output.strip().splitlines()[-1])
  assert answer['codes'] == [protocol.MALFORMED] * 14 and answer['served'] and answer['pong']
  assert done.leftover_pids == []
