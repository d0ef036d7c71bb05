"""Run status: snapshots from a run directory and a backend, the table, the RPC encoding."""
import json
import os
import threading
import time

import numpy as np
import pytest

from ntkdd.server import checkpoint, status


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
  checkpoint.write_json(run_dir / 'config.json', {
      'command': 'distill', 'created': created,
      'flags': {'algorithm': 'kip', 'dataset': 'mnist', 'ipc': 10, 'steps': total, 'arch': 'fc'},
      'dataset': {'name': 'mnist'}})
  checkpoint.append_metrics(run_dir / 'metrics.jsonl', {
      'step': 0, 'loss': None, 'krr_test_accuracy': 0.5, 'wall_time': 0.0})
  for step in range(1, steps_done + 1):
    record = {'step': step, 'loss': 1.0 / step, 'wall_time': 2.0 * step,
              'pairs_per_second': 1000.0 + step}
    if step % 10 == 0:
      record['krr_test_accuracy'] = {10: 0.81, 20: 0.875, 30: 0.86}.get(step, 0.85)
    checkpoint.append_metrics(run_dir / 'metrics.jsonl', record)
  with open(run_dir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 31, "lo')   # a torn line of a killed run is skipped
  checkpoint.save_checkpoint(run_dir, {'images': np.zeros((2, 3), np.float32)},
                             {'step': 20, 'elapsed': 40.0})
  past = time.time() - 30
  os.utime(run_dir / 'checkpoint.npz', (past, past))
  if with_summary:
    checkpoint.write_json(run_dir / 'summary.json', {'steps': total})


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


def test_status_with_backend_and_phases(tmp_path):
  run = tmp_path / 'run'
  _fabricate(run, steps_done=100, with_summary=True)
  snap = status.status_from_run_dir(str(run), backend=FakeBackend())
  assert snap['phase'] == 'done' and snap['eta_s'] == 0.0
  assert snap['pairs_per_second'] == 12345.0 and snap['alive_workers'] == 1
  assert [w['pid'] for w in snap['workers']] == [4242, 4243]
  checkpoint.write_json(run / status.RESULT_FILE, {'ok': False, 'error': 'ValueError: boom'})
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
  text = status.format_status(holder.snapshot())
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
  # An empty snapshot still prints.
  assert 'step' in status.format_status({})


def test_addresses_and_the_missing_courier(tmp_path):
  with pytest.raises(status.StatusQueryError, match='HOST:PORT'):
    status.resolve_address('nonsense')
  with pytest.raises(status.StatusQueryError, match='coordinator_address.txt'):
    status.resolve_address(str(tmp_path))
  (tmp_path / status.ADDRESS_FILE).write_text('localhost:4321\n')
  assert status.resolve_address(str(tmp_path)) == 'localhost:4321'
  try:
    import courier  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match=r'ntkdd\[launchpad\]'):
      status.query_status('localhost:1', timeout_s=1)
  else:
    with pytest.raises(status.StatusQueryError):   # nobody serves there
      status.query_status('localhost:1', timeout_s=2)


def test_an_in_process_run_directory_is_read_directly(tmp_path, capsys):
  run = tmp_path / 'run'
  _fabricate(run)
  snap = status.query_status(str(run))     # no coordinator_address.txt: no RPC needed
  assert snap['source'] == 'run_dir' and snap['step'] == 30 and snap['best_accuracy'] == 0.875
  assert status.main([str(run)]) == 0
  assert 'the run directory' in capsys.readouterr().out
  # RCIG logs the finite network's accuracy as test_accuracy.
  rcig_run = tmp_path / 'rcig'
  rcig_run.mkdir()
  checkpoint.write_json(rcig_run / 'config.json', {'flags': {'algorithm': 'rcig', 'steps': 9}})
  for step, acc in ((0, 0.4), (5, 0.7)):
    checkpoint.append_metrics(rcig_run / 'metrics.jsonl', {'step': step, 'test_accuracy': acc,
                                                            'wall_time': float(step)})
  snap = status.query_status(str(rcig_run))
  assert snap['last_accuracy'] == 0.7 and snap['initial_accuracy'] == 0.4
  assert 'NN test acc' in status.format_status(snap)
  with pytest.raises(status.StatusQueryError, match='coordinator_address.txt'):
    status.query_status(str(tmp_path))    # not a run directory at all
