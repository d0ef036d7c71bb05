"""Run status: snapshots from a run directory and a backend, the table, RPC encoding, clients."""
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ntkdd.launch import status_client
from ntkdd.server import checkpoint, status
from ntkdd.server import progress as progress_lib
from ntkdd.server import run_dir as run_dir_lib
from run_helpers import wait_for


class FakeBackend:
  def status(self):
    return {'alive_workers': 1, 'pairs_per_second': 12345.0, 'blocks_done': 40, 'workers': [
        {'worker': 0, 'alive': True, 'blocks_done': 31, 'pairs_done': 1984, 'in_flight': 1,
         'failures': 0, 'seconds_since_seen': 0.4, 'last_error': None, 'down_for_s': None,
         'pid': 4242, 'device': 'cpu:0'},
        {'worker': 1, 'alive': False, 'blocks_done': 9, 'pairs_done': 576, 'in_flight': 0,
         'failures': 3, 'seconds_since_seen': 75.0, 'last_error': 'StatusNotOk: Socket closed',
         'down_for_s': 70.0, 'pid': 4243, 'device': 'cpu:0'}]}


def _fabricate(run_dir, steps_done=30, total=100, with_summary=False):
  run_dir.mkdir()
  created = time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(time.time() - 120))
  run_dir_lib.write_json(run_dir / 'config.json', {
      'command': 'distill', 'created': created,
      'flags': {'algorithm': 'kip', 'dataset': 'mnist', 'ipc': 10, 'steps': total, 'arch': 'fc'},
      'dataset': {'name': 'mnist'}})
  run_dir_lib.append_metrics(run_dir / 'metrics.jsonl', {
      'step': 0, 'loss': None, 'krr_test_accuracy': 0.5, 'wall_time': 0.0})
  for step in range(1, steps_done + 1):
    record = {'step': step, 'loss': 1.0 / step, 'wall_time': 2.0 * step,
              'pairs_per_second': 1000.0 + step}
    if step % 10 == 0:
      record['krr_test_accuracy'] = {10: 0.81, 20: 0.875, 30: 0.86}.get(step, 0.85)
    run_dir_lib.append_metrics(run_dir / 'metrics.jsonl', record)
  with open(run_dir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 31, "lo')   # a torn line of a killed run is skipped
  checkpoint.save_checkpoint(run_dir, {'images': np.zeros((2, 3), np.float32)},
                             {'step': 20, 'elapsed': 40.0})
  past = time.time() - 30
  os.utime(run_dir / 'checkpoint.npz', (past, past))
  if with_summary:
    run_dir_lib.write_json(run_dir / 'summary.json', {'steps': total})


def test_status_from_run_dir(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run)
  # The clock fixed 30 s after the checkpoint was written: ages are exact, not time windows.
  now = (run / 'checkpoint.npz').stat().st_mtime + 30
  created = json.loads((run / 'config.json').read_text())['created']
  snap = status.status_from_run_dir(str(run), now=now)
  assert snap['phase'] == 'running' and snap['algorithm'] == 'kip' and snap['dataset'] == 'mnist'
  assert snap['step'] == 30 and snap['total_steps'] == 100
  assert snap['loss'] == pytest.approx(1 / 30)
  assert snap['initial_accuracy'] == 0.5
  assert (snap['last_accuracy'], snap['last_accuracy_step']) == (0.86, 30)
  assert (snap['best_accuracy'], snap['best_accuracy_step']) == (0.875, 20)
  assert snap['pairs_per_second'] == 1030.0
  assert snap['seconds_per_step'] == pytest.approx(2.0)
  assert snap['eta_s'] == pytest.approx(70 * 2.0)
  assert snap['checkpoint_step'] == 20 and snap['checkpoint_age_s'] == pytest.approx(30)
  assert snap['elapsed_s'] == pytest.approx(
      now - time.mktime(time.strptime(created, '%Y-%m-%dT%H:%M:%S%z')))
  assert snap['workers'] == []
  json.dumps(snap)   # JSON-able


def test_a_finished_run_without_a_snapshot_counts_run_time_not_age(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run, steps_done=100, with_summary=True)   # created 120 s ago
  finished = time.time() - 60
  os.utime(run / 'summary.json', (finished, finished))
  snap = status_client.query_status(str(run))
  assert snap['source'] == 'run_dir' and snap['phase'] == 'done' and snap['eta_s'] == 0.0
  assert snap['ended'] == pytest.approx(finished, abs=1)
  assert 50 <= snap['elapsed_s'] <= 70   # from its start to its summary, not to now


def test_status_with_backend_and_phases(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run, steps_done=100, with_summary=True)
  snap = status.status_from_run_dir(str(run), backend=FakeBackend())
  assert snap['phase'] == 'done' and snap['eta_s'] == 0.0
  assert snap['pairs_per_second'] == 12345.0 and snap['alive_workers'] == 1
  assert [w['pid'] for w in snap['workers']] == [4242, 4243]
  assert [w['core'] for w in snap['workers']] == [None, None]

  class PinnedBackend(FakeBackend):
    def status(self):
      report = super().status()
      for w in report['workers']:
        w['core'] = w['worker']
      return report

  snap = status.status_from_run_dir(str(run), backend=PinnedBackend())
  assert [w['core'] for w in snap['workers']] == [0, 1]   # the backend's cores reach status
  run_dir_lib.write_json(run / run_dir_lib.COORDINATOR_RESULT,
                         {'ok': False, 'error': 'ValueError: boom'})
  snap = status.status_from_run_dir(str(run))
  assert snap['phase'] == 'failed' and snap['error'] == 'ValueError: boom'
  assert status.status_from_run_dir(str(tmp_path / 'nothing'))['phase'] == 'starting'


def test_run_status_holder_is_thread_safe_and_json(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run)
  holder = status.RunStatus(str(run), total_steps=100)
  holder.set_extra(address='localhost:1234', coordinator_pid=99)
  holder.attach_backend(FakeBackend())
  holder.set_phase('running')
  errors = []

  def hammer():
    try:
      for i in range(50):
        holder.update(note=i)
        status.decode(holder.to_bytes())
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  threads = [threading.Thread(target=hammer) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert not errors
  snap = status.decode(holder.to_bytes())
  assert snap['phase'] == 'running' and snap['address'] == 'localhost:1234'
  assert snap['step'] == 30 and len(snap['workers']) == 2
  holder.set_phase('failed', 'RuntimeError: workers gone')
  snap = holder.snapshot()
  assert snap['phase'] == 'failed' and 'workers gone' in snap['error']
  with pytest.raises(ValueError):
    holder.set_phase('sleeping')
  # No run directory: the fields set directly are the status.
  bare = status.RunStatus(total_steps=5)
  bare.update(step=2, loss=float('nan'))
  snap = status.decode(bare.to_bytes())
  assert snap['step'] == 2 and snap['total_steps'] == 5 and snap['loss'] is None


def test_format_status_shows_the_numbers_and_workers(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run)
  holder = status.RunStatus(str(run), backend=FakeBackend())
  holder.set_extra(address='localhost:1234', coordinator_pid=99)
  holder.set_phase('running')
  text = status_client.format_status(holder.snapshot())
  assert str(run) in text and 'kip mnist ipc=10' in text
  assert '30/100 (30%)' in text and '0.03333' in text
  assert '86.00% (step 30)' in text and '87.50% (step 20)' in text and '50.00%' in text
  assert '12,345' in text
  assert 'ETA' in text and '2m20s' in text
  assert 'step 20' in text and 'ago' in text
  assert 'workers: 2, 1 alive' in text
  rows = [line.split() for line in text.splitlines()]
  worker0 = next(r for r in rows if r[:2] == ['0', 'yes'])
  worker1 = next(r for r in rows if r[:2] == ['1', 'NO'])
  assert worker0[2] == '31' and '4242' in worker0
  assert worker1[2] == '9' and worker1[3] == '3' and '1m15s' in worker1
  assert 'Socket closed' in ' '.join(worker1)
  header = next(r for r in rows if r[:2] == ['id', 'alive'])
  assert 'core' not in header    # no worker is pinned: no column
  # Pinned workers (--pin-workers) report their core: a column after the pid.
  snapshot = holder.snapshot()
  snapshot['workers'][0]['core'] = 1
  rows = [line.split() for line in status_client.format_status(snapshot).splitlines()]
  header = next(r for r in rows if r[:2] == ['id', 'alive'])
  worker0 = next(r for r in rows if r[:2] == ['0', 'yes'])
  worker1 = next(r for r in rows if r[:2] == ['1', 'NO'])
  assert 'core' in header and worker0[worker0.index('4242') + 1] == '1'
  assert worker1[worker1.index('4243') + 1] == '-'
  # An empty snapshot still prints.
  assert 'step' in status_client.format_status({})


def test_addresses_and_the_missing_courier(tmp_path):
  with pytest.raises(status.StatusQueryError, match='HOST:PORT'):
    status_client.resolve_address('nonsense')
  with pytest.raises(status.StatusQueryError, match='coordinator_address.txt'):
    status_client.resolve_address(str(tmp_path))
  (tmp_path / run_dir_lib.COORDINATOR_ADDRESS_FILE).write_text('localhost:4321\n')
  assert status_client.resolve_address(str(tmp_path)) == 'localhost:4321'
  try:
    import courier  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match=r'ntkdd\[launchpad\]'):
      status_client.query_status('localhost:1', timeout_s=1)
  else:
    with pytest.raises(status.StatusQueryError):   # nobody serves there
      status_client.query_status('localhost:1', timeout_s=2)


def test_an_in_process_run_directory_is_read_directly(tmp_path, capsys):
  run = tmp_path / 'run'
  _fabricate(run)
  snap = status_client.query_status(str(run))     # no coordinator_address.txt: no RPC needed
  assert snap['source'] == 'run_dir' and snap['step'] == 30 and snap['best_accuracy'] == 0.875
  assert status_client.print_status(str(run)) == 0
  assert 'the run directory' in capsys.readouterr().out
  # RCIG logs the finite network's accuracy as test_accuracy.
  rcig_run = tmp_path / 'rcig'
  rcig_run.mkdir()
  run_dir_lib.write_json(rcig_run / 'config.json', {'flags': {'algorithm': 'rcig', 'steps': 9}})
  for step, acc in ((0, 0.4), (5, 0.7)):
    run_dir_lib.append_metrics(rcig_run / 'metrics.jsonl', {'step': step, 'test_accuracy': acc,
                                                            'wall_time': float(step)})
  snap = status_client.query_status(str(rcig_run))
  assert snap['last_accuracy'] == 0.7 and snap['initial_accuracy'] == 0.4
  assert 'NN test acc' in status_client.format_status(snap)
  with pytest.raises(status.StatusQueryError, match='holds no run'):
    status_client.query_status(str(tmp_path))    # not a run directory at all


def test_a_finished_label_solve_reports_the_random_real_accuracy_as_initial(tmp_path):
  # Label Solve's one metrics row (step 0) is the solved set's accuracy; the random real
  # images' accuracy is in its summary.
  run = tmp_path / 'ls'
  run.mkdir()
  run_dir_lib.write_json(run / 'config.json', {'flags': {'algorithm': 'ls', 'steps': 0}})
  run_dir_lib.append_metrics(run / 'metrics.jsonl', {'step': 0, 'loss': None,
                                                     'krr_test_accuracy': 0.28, 'wall_time': 9.0})
  run_dir_lib.write_json(run / 'summary.json', {'algorithm': 'ls', 'steps': 0,
                                                'krr_test_accuracy_before': 0.16,
                                                'krr_test_accuracy_after': 0.28})
  snap = status.status_from_run_dir(str(run))
  assert snap['phase'] == 'done'
  assert (snap['initial_accuracy'], snap['last_accuracy'], snap['best_accuracy']) == (
      0.16, 0.28, 0.28)
  assert 'initial 16.00%' in status_client.format_status(snap)


def test_a_run_directory_without_a_live_status_is_not_called_running(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run)   # metrics and a checkpoint, but nothing says whether a process still runs
  snap = status_client.query_status(str(run))
  assert snap['phase'] == 'running' and 'judged running' in snap['error']   # written just now
  past = time.time() - 3600
  for name in ('metrics.jsonl', 'checkpoint.npz', 'config.json'):
    os.utime(run / name, (past, past))
  snap = status_client.query_status(str(run))
  assert snap['source'] == 'run_dir' and snap['phase'] == 'unknown' and snap['eta_s'] is None
  assert 'cannot tell' in snap['error']
  text = status_client.format_status(snap)
  assert 'unknown' in text and 'running' not in text


# -- Publishing: status.sock and status.json. ---------------------------------------------------

def _dead_pid():
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait(30)
  return child.pid


def test_publisher_serves_the_socket_then_leaves_a_final_snapshot(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run)
  holder = status.RunStatus(str(run), total_steps=100)
  holder.set_phase('running')
  publisher = status.StatusPublisher(holder, str(run), every_s=0.05).start()
  try:
    sock, snapshot = run / run_dir_lib.STATUS_SOCKET, run / run_dir_lib.STATUS_JSON
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    live = status_client.query_status(str(run))
    assert live['source'] == 'socket' and live['phase'] == 'running' and live['step'] == 30
    assert live['status_pid'] == os.getpid()
    assert 'status.sock (live)' in status_client.format_status(live)
    holder.update(step=31)
    first = json.loads(snapshot.read_text())['time']
    wait_for(lambda: json.loads(snapshot.read_text())['time'] > first, 30, 'a newer snapshot')
    assert json.loads(snapshot.read_text())['step'] == 31
  finally:
    publisher.finish()
  assert not (run / run_dir_lib.STATUS_SOCKET).exists()
  final = json.loads((run / run_dir_lib.STATUS_JSON).read_text())
  assert final['snapshot_final'] and final['phase'] == 'done' and final['ended']
  after = status_client.query_status(str(run))
  assert after['source'] == 'snapshot' and after['phase'] == 'done' and after['eta_s'] == 0.0
  assert after['elapsed_s'] == pytest.approx(final['elapsed_s'], abs=1.0)   # frozen at the end
  text = status_client.format_status(after)
  assert 'status.json, written' in text and 'the final one' in text and 'ended' in text


def test_publishing_records_interruptions_and_failures(tmp_path):
  class Interrupted(RuntimeError):
    pass

  for error, phase in ((Interrupted('Stopped by signal at step 3'), 'interrupted'),
                       (ValueError('boom'), 'failed')):
    run = tmp_path / phase
    run.mkdir()
    with pytest.raises(type(error)):
      with status.publishing(status.RunStatus(str(run)), str(run)):
        raise error
    snap = status_client.query_status(str(run))
    assert snap['source'] == 'snapshot' and snap['phase'] == phase and snap['eta_s'] is None
    assert str(error) in snap['error']


def test_a_killed_run_shows_as_crashed_not_running(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run)
  holder = status.RunStatus(str(run), total_steps=100)
  holder.set_phase('running')
  snap = holder.snapshot()
  assert snap['eta_s'] > 0
  # What a SIGKILLed run leaves: a snapshot in phase running from a pid that no longer exists,
  # and a stale socket nobody answers on.
  snap.update(status_pid=_dead_pid(), status_host=socket.gethostname(),
              time=time.time() - 50)
  run_dir_lib.write_json(run / run_dir_lib.STATUS_JSON, snap)
  stale = socket.socket(socket.AF_UNIX)
  stale.bind(str(run / run_dir_lib.STATUS_SOCKET))
  stale.close()
  got = status_client.query_status(str(run))
  assert got['source'] == 'snapshot' and got['phase'] == 'crashed'
  assert got['eta_s'] is None and 'is gone' in got['error'] and '--resume' in got['error']
  assert got['socket_error'] and 49 <= got['source_age_s'] < 120
  assert got['elapsed_s'] == pytest.approx(snap['elapsed_s'], abs=1.0)   # not growing
  # A coordinator that recorded its end wins over the pid.
  run_dir_lib.write_json(run / run_dir_lib.COORDINATOR_RESULT, {'ok': False, 'interrupted': True,
                                                   'error': 'Stopped by signal at step 30'})
  got = status_client.query_status(str(run))
  assert got['phase'] == 'interrupted' and 'step 30' in got['error']


def _world_traversable_dir():
  folder = tempfile.mkdtemp(prefix='ntkdd-status-test-')
  os.chmod(folder, 0o755)
  return Path(folder)


def test_another_user_cannot_connect_or_read(tmp_path):
  if os.getuid() != 0 or not shutil.which('setpriv'):
    pytest.skip('needs root and setpriv to act as another user')
  base = _world_traversable_dir()
  try:
    run = base / 'run'
    run.mkdir()
    os.chmod(run, 0o755)
    holder = status.RunStatus(str(run))
    with status.publishing(holder, str(run)):
      code = ('import errno, socket, sys\n'
              's = socket.socket(socket.AF_UNIX)\n'
              'try:\n'
              '  s.connect(sys.argv[1]); print("connected")\n'
              'except OSError as e:\n'
              '  print(errno.errorcode[e.errno])\n'
              'try:\n'
              '  open(sys.argv[2]).read(); print("read")\n'
              'except OSError as e:\n'
              '  print(errno.errorcode[e.errno])\n')
      argv = [str(run / run_dir_lib.STATUS_SOCKET), str(run / run_dir_lib.STATUS_JSON)]
      nobody = subprocess.run(['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups',
                               sys.executable, '-c', code] + argv,
                              capture_output=True, text=True, timeout=60)
      assert nobody.stdout.split() == ['EACCES', 'EACCES'], nobody.stdout + nobody.stderr
      # The same program as this user does connect (so the refusal above is the permissions).
      me = subprocess.run([sys.executable, '-c', code] + argv, capture_output=True, text=True,
                          timeout=60)
      assert me.stdout.split() == ['connected', 'read'], me.stdout + me.stderr
  finally:
    shutil.rmtree(base, ignore_errors=True)


def test_a_long_run_directory_path_still_gets_a_socket(tmp_path):
  run = tmp_path / ('d' * 60) / ('e' * 60)
  run.mkdir(parents=True)
  with status.publishing(status.RunStatus(str(run)), str(run)):
    assert status_client.query_status(str(run))['source'] == 'socket'
  assert status_client.query_status(str(run))['source'] == 'snapshot'


# -- Progress of long kernel computations. ------------------------------------------------------

class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_kernel_progress_goes_to_status_and_to_the_log(caplog):
  holder = status.RunStatus(total_steps=10)
  holder.set_phase('running')
  clock = _Clock()
  progress = progress_lib.KernelProgress('kernel', 1000, holder=holder, log_every_s=30, clock=clock)
  with caplog.at_level('INFO'):
    clock.now = 10.0
    progress.update(100)                     # 10 s in: status only, no log line yet
    snap = holder.snapshot()
    assert snap['kernel_progress']['pairs_done'] == 100
    assert snap['kernel_progress']['pairs_per_second'] == pytest.approx(10.0)
    assert snap['kernel_progress']['eta_s'] == pytest.approx(90.0)
    table = status_client.format_status(snap)
    assert 'kernel' in table and '100/1,000 pairs' in table
    assert 'pairs' not in caplog.text
    clock.now = 31.0
    progress.add(210)                        # 31 s in: a log line
    assert '310/1,000 pairs (31.0%)' in caplog.text and 'ETA' in caplog.text
    clock.now = 40.0
    progress.update(1000)
    progress.close()
  assert '(done)' in caplog.text
  assert 'kernel_progress' not in holder.snapshot()


def test_kernel_computations_report_to_the_run_status(caplog):
  from ntkdd.common import architectures
  from ntkdd.launch.inprocess import make_inprocess_backend
  from ntkdd.server import backend as backend_lib
  holder = status.RunStatus()
  seen = []
  holder.update = lambda **fields: seen.append(fields.get('kernel_progress'))
  token = progress_lib.KERNEL_PROGRESS_HOLDER.set(holder)
  x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  arch = architectures.Architecture('fc', 1)
  try:
    backend_lib.InProcessKernels(arch, tile=4).kernel(x)
    in_process = [s['pairs_done'] for s in seen if s]
    seen.clear()
    with make_inprocess_backend(arch, workers=2, block=4) as distributed:
      distributed.kernel(x, x[:6])
    distributed_done = [s['pairs_done'] for s in seen if s]
  finally:
    progress_lib.KERNEL_PROGRESS_HOLDER.reset(token)
  assert in_process == sorted(in_process) and in_process[-1] == 100 and len(in_process) > 1
  assert seen[-1] is None    # cleared at the end
  assert sorted(distributed_done) == distributed_done and distributed_done[-1] == 60
  assert len(distributed_done) == 6     # 3 x 2 blocks of 4


# -- An in-process run, live and after it was stopped or killed. -------------------------------

def _start_distill(tiny_npz, run):
  argv = [sys.executable, '-m', 'ntkdd.launch.cli', 'distill', '--algorithm', 'kip',
          '--dataset', str(tiny_npz), '--data-dir', '.', '--ipc', '2', '--steps', '100000',
          '--arch', 'fc', '--depth', '1', '--target-batch', '12', '--eval-every', '1000',
          '--checkpoint-every', '1000', '--out', str(run), '--no-progress']
  return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _steps_done(run):
  try:
    return sum(1 for _ in open(run / 'metrics.jsonl')) - 1
  except OSError:
    return -1


@pytest.mark.parametrize('stop', ['SIGINT', 'SIGKILL'])
def test_an_in_process_run_that_was_stopped_or_killed_says_so(tiny_npz, tmp_path, stop):
  import signal
  run = tmp_path / 'run'
  process = _start_distill(tiny_npz, run)
  try:
    wait_for(lambda: _steps_done(run) >= 2, 180, 'step 2',
             running=lambda: process.poll() is None)
    live = status_client.query_status(str(run))
    assert live['source'] == 'socket' and live['phase'] == 'running', live
    assert live['status_pid'] == process.pid and live['eta_s'] is not None
    process.send_signal(getattr(signal, stop))
    process.wait(120)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  snap = status_client.query_status(str(run))
  assert snap['source'] == 'snapshot' and snap['eta_s'] is None, snap
  if stop == 'SIGINT':
    assert snap['phase'] == 'interrupted' and snap['snapshot_final']
    assert 'Stopped by signal' in snap['error'] and snap['ended']
    assert not (run / run_dir_lib.STATUS_SOCKET).exists()
  else:
    assert snap['phase'] == 'crashed' and str(process.pid) in snap['error']
  elapsed = snap['elapsed_s']
  time.sleep(1.5)
  assert status_client.query_status(str(run))['elapsed_s'] == elapsed   # run time, not age
  text = status_client.format_status(snap)
  assert snap['phase'] in text and 'ended' in text and 'status.json, written' in text


def test_label_solve_has_no_steps_to_count(tmp_path):
  run = tmp_path / 'ls'
  run.mkdir()
  run_dir_lib.write_json(run / 'config.json', {'flags': {'algorithm': 'ls', 'steps': 1000}})
  holder = status.RunStatus(str(run), total_steps=status.total_steps({'algorithm': 'ls'}))
  holder.set_phase('running')
  holder.update(kernel_progress={'what': 'kernel', 'pairs_done': 5, 'pairs_total': 10})
  snap = holder.snapshot()
  assert snap['total_steps'] is None and snap['eta_s'] is None
  text = status_client.format_status(snap)
  assert '/1000' not in text and '5/10 pairs' in text
