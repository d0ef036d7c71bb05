"""The run directory's owner (server/run_dir.py), the call-with-deadline helper and the layering
of status: the payload in server/, the clients in launch/."""
import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

from ntkdd.launch import cli, status_client
from ntkdd.server import checkpoint, deadline
from ntkdd.server import run_dir as run_dir_lib


def test_file_names_are_the_on_disk_format():
  # Old run directories resume and `ntkdd status` reads them: these names must never change.
  assert {name: getattr(run_dir_lib, name) for name in (
      'CONFIG', 'METRICS', 'CHECKPOINT', 'SUPPORT', 'SUMMARY', 'EVALUATION', 'SUPPORT_PNG',
      'CURVES_PNG', 'STATUS_JSON', 'STATUS_SOCKET', 'COORDINATOR_RESULT',
      'COORDINATOR_ADDRESS_FILE', 'RAY_ADDRESS_FILE', 'WORKER_PIDS', 'LAUNCHPAD_PROCESSES',
      'LAUNCHPAD_SPEC', 'LAUNCHPAD_LOGS', 'LAUNCHER_LOG', 'LAUNCHPAD_NETNS')} == {
      'CONFIG': 'config.json', 'METRICS': 'metrics.jsonl', 'CHECKPOINT': 'checkpoint.npz',
      'SUPPORT': 'support.npz', 'SUMMARY': 'summary.json', 'EVALUATION': 'evaluation.json',
      'SUPPORT_PNG': 'support.png', 'CURVES_PNG': 'curves.png', 'STATUS_JSON': 'status.json',
      'STATUS_SOCKET': 'status.sock', 'COORDINATOR_RESULT': 'coordinator_result.json',
      'COORDINATOR_ADDRESS_FILE': 'coordinator_address.txt',
      'RAY_ADDRESS_FILE': 'ray_address.txt', 'WORKER_PIDS': 'worker_pids.json',
      'LAUNCHPAD_PROCESSES': 'launchpad_processes.json', 'LAUNCHPAD_SPEC': 'launchpad_spec.json',
      'LAUNCHPAD_LOGS': 'launchpad_logs', 'LAUNCHER_LOG': 'launcher.log',
      'LAUNCHPAD_NETNS': 'netns'}
  assert run_dir_lib.RUN_FILES == ('config.json', 'checkpoint.npz', 'support.npz',
                                   'summary.json', 'metrics.jsonl')


def test_writers_are_atomic_and_readers_forgiving(tmp_path, caplog):
  run_dir_lib.write_json(tmp_path / 'a.json', {'x': np.float32(1.5), 'y': np.arange(2)})
  assert json.loads((tmp_path / 'a.json').read_text()) == {'x': 1.5, 'y': [0, 1]}
  run_dir_lib.write_text(tmp_path / 'b.txt', 'localhost:1\n')
  assert (tmp_path / 'b.txt').read_text() == 'localhost:1\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json', 'b.txt']   # no temp files
  # Readers: None for a missing or damaged file (a live run's view), one clear error otherwise.
  (tmp_path / 'torn.json').write_text('{"x": ')
  assert run_dir_lib.read_json(tmp_path / 'torn.json') is None
  assert run_dir_lib.read_json(tmp_path / 'nothing.json') is None
  with pytest.raises(ValueError, match='not valid JSON'):
    run_dir_lib.read_json_object(tmp_path / 'torn.json')
  (tmp_path / 'list.json').write_text('[1]')
  with pytest.raises(ValueError, match='JSON object, found list'):
    run_dir_lib.read_json_object(tmp_path / 'list.json')
  with caplog.at_level(logging.WARNING):
    assert run_dir_lib.read_optional_json_object(tmp_path / 'torn.json') is None
  assert 'not valid JSON' in caplog.text
  assert run_dir_lib.read_optional_json_object(tmp_path / 'nothing.json') is None


def test_metrics_append_truncate_and_read(tmp_path, caplog):
  assert run_dir_lib.read_metrics(tmp_path) == []     # none yet
  path = tmp_path / run_dir_lib.METRICS
  for step in range(4):
    run_dir_lib.append_metrics(path, {'step': step, 'loss': np.float64(1.0 / (step + 1))})
  with open(path, 'a') as f:
    f.write('{"step": 4, "lo')   # a run killed mid-append
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert [r['step'] for r in run_dir_lib.read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert caplog.text == ''   # quiet by default: status reads it every few seconds
    assert len(run_dir_lib.read_metrics(tmp_path, warn=True)) == 4
  assert 'torn last line' in caplog.text
  run_dir_lib.truncate_metrics(path, 1)      # resuming from the checkpoint of step 1
  assert [r['step'] for r in run_dir_lib.read_metrics(tmp_path)] == [0, 1]


def test_checkpoint_step_reads_the_meta_record_only(tmp_path):
  assert checkpoint.checkpoint_step(tmp_path / run_dir_lib.CHECKPOINT) is None
  checkpoint.save_checkpoint(tmp_path, {'images': np.zeros((2, 3))},
                             {'step': 7, 'rng_state': 0, 'elapsed': 1.0, 'before': 0.1,
                              'best': 0.2})
  assert checkpoint.checkpoint_step(tmp_path / run_dir_lib.CHECKPOINT) == 7
  arrays, meta = checkpoint.load_checkpoint(tmp_path, ('images',))
  assert meta['step'] == 7 and arrays['images'].shape == (2, 3)
  (tmp_path / run_dir_lib.CHECKPOINT).write_bytes(b'PK not a zip')
  assert checkpoint.checkpoint_step(tmp_path / run_dir_lib.CHECKPOINT) is None


def test_call_with_deadline_answers_raises_and_gives_up():
  assert deadline.call_with_deadline(lambda a, b: a + b, 30, (2, 3)) == 5
  with pytest.raises(KeyError, match='boom'):     # fn's own exception, as it raised it
    deadline.call_with_deadline(lambda: {}['boom'], 30)
  release = threading.Event()
  try:
    with pytest.raises(deadline.DeadlineExceeded):
      deadline.call_with_deadline(release.wait, 0.2, (60,), name='ntkdd-test-hang')
    assert any(t.name == 'ntkdd-test-hang' for t in threading.enumerate())  # left running
  finally:
    release.set()
  assert issubclass(deadline.DeadlineExceeded, TimeoutError)


def test_one_caller_makes_calls_in_order():
  caller = deadline.Caller(name='ntkdd-test-caller')
  seen = []
  boxes = [caller.submit(seen.append, (i,)) for i in range(5)]
  caller.stop()
  for box, done in boxes:
    assert done.wait(30) and 'error' not in box
  assert seen == [0, 1, 2, 3, 4]


def test_status_payload_imports_no_client_or_launcher():
  code = ('import sys; import ntkdd.server.status, ntkdd.server.run_dir; '
          'bad = sorted(m for m in sys.modules if m.split(".")[0] in ("courier", "ray", '
          '"launchpad") or m.startswith("ntkdd.launch")); print(bad)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'


def test_ntkdd_status_is_one_argparse(tmp_path, capsys):
  run = tmp_path / 'run'
  run.mkdir()
  run_dir_lib.write_json(run / run_dir_lib.CONFIG, {'flags': {'algorithm': 'kip', 'steps': 10}})
  run_dir_lib.append_metrics(run / run_dir_lib.METRICS, {'step': 3, 'loss': 0.5, 'wall_time': 3})
  assert cli.main(['status', str(run), '--json', '--timeout', '5']) == 0
  snap = json.loads(capsys.readouterr().out)
  assert snap['source'] == 'run_dir' and snap['step'] == 3 and snap['total_steps'] == 10
  assert cli.main(['status', '--address', str(run)]) == 0
  table = capsys.readouterr().out
  assert '3/10 (30%)' in table and status_client.format_status(snap).splitlines()[0] in table
  assert cli.main(['status']) == 2
  assert 'give the run directory' in capsys.readouterr().err
  assert cli.main(['status', str(tmp_path / 'nothing')]) == 2
  assert 'HOST:PORT' in capsys.readouterr().err
  (tmp_path / 'empty').mkdir()
  assert cli.main(['status', str(tmp_path / 'empty')]) == 2
  assert 'holds no run' in capsys.readouterr().err
