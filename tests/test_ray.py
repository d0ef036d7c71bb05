"""The Ray launch type: errors without a cluster, a private local Ray, a two-node cluster.

Every Ray here runs in a network namespace of its own where only loopback exists (a local Ray
advertises the machine's non-loopback address otherwise): the local-Ray cases
(tests/ray_local_cases.py) run as a pytest inside `unshare -n`; the two-node test runs a real
cluster (`ray start` twice: a head and a second node) there. Every process of the namespace
is killed by pid when it ends, and every wait has a timeout.
"""
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip('ray')

from ntkdd.launch import cli, private_network, ray_cluster, ray_status  # noqa: E402
from ntkdd.server import status  # noqa: E402
from run_helpers import assert_same_support as _assert_same_support  # noqa: E402
from run_helpers import run_inprocess as _inprocess, steps as _steps  # noqa: E402
from run_helpers import tiny_cfg as _cfg  # noqa: E402


# -- Without a cluster. -------------------------------------------------------------------------

def test_status_needs_an_address(capsys):
  assert cli.main(['status']) == 2
  assert '--ray-address' in capsys.readouterr().err


def test_missing_ray_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'ray', None)   # `import ray` raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'ntkdd\[ray\]'"):
    ray_cluster.import_ray()


def test_status_of_an_address_nobody_serves_fails_at_once(monkeypatch):
  # At once: refused by the reachability check, before ray.init (which retries for minutes).
  def no_init(*args, **kwargs):
    raise AssertionError('ray.init was called for an address nobody serves')

  monkeypatch.setattr(ray, 'init', no_init)
  with pytest.raises(status.StatusQueryError, match='No Ray cluster answers at 127.0.0.1:1'):
    ray_status.query_ray_status('127.0.0.1:1', 'x')


def test_a_hung_status_query_is_abandoned(monkeypatch):
  release, returned = threading.Event(), threading.Event()

  def hung_query(*args):
    release.wait(120)   # a bound, so a caller that waits for it fails instead of hanging
    returned.set()

  monkeypatch.setattr(ray_status, '_query', hung_query)
  try:
    with pytest.raises(ray_status.StatusTimeout, match='within 0.5 s'):
      ray_status.query_ray_status('127.0.0.1:1', 'x', timeout_s=0.2, connect_timeout_s=0.3)
    assert not returned.is_set()   # it gave up while the query was still under way
  finally:
    release.set()


def test_default_address_is_a_running_cluster_else_a_private_local_ray(monkeypatch, tmp_path,
                                                                       caplog):
  """No --ray-address: RAY_ADDRESS, else the `ray start` cluster file, else 'local'."""
  caplog.set_level('INFO')
  monkeypatch.delenv('RAY_ADDRESS', raising=False)
  monkeypatch.setenv('RAY_TMPDIR', str(tmp_path))   # Ray's cluster file lives here: none yet
  assert ray_cluster.running_cluster_address()[0] is None
  assert ray_cluster._default_address() == 'local'
  assert 'no running cluster' in caplog.text and 'private local Ray' in caplog.text
  # A cluster file left by a `ray start` whose cluster is gone: a private Ray, with a warning.
  (tmp_path / 'ray').mkdir()
  (tmp_path / 'ray' / 'ray_current_cluster').write_text('127.0.0.1:1')
  assert ray_cluster.running_cluster_address() == (
      '127.0.0.1:1', 'the cluster `ray start` began on this machine')
  caplog.clear()
  assert ray_cluster._default_address() == 'local'
  assert 'does not answer' in caplog.text
  # RAY_ADDRESS wins, and naming a cluster that is not there is an error, not a fallback.
  monkeypatch.setenv('RAY_ADDRESS', '127.0.0.1:1')
  assert ray_cluster.running_cluster_address() == ('127.0.0.1:1', 'RAY_ADDRESS')
  with pytest.raises(ConnectionError, match='RAY_ADDRESS=127.0.0.1:1 names no running Ray'):
    ray_cluster._default_address()


def test_cli_ray_address_defaults_to_none():
  args = cli._parser().parse_args(['distill', '--out', 'x', '--launch', 'ray'])
  assert args.ray_address is None


# -- A private local Ray, in a network namespace of its own. -----------------------------------

def _private_network():
  prefix = private_network.unshare_prefix()
  if prefix is None:
    pytest.skip('needs `unshare -n` (a private network namespace) and `ip`, which this '
                'machine does not allow: Ray would advertise the non-loopback address.')
  return prefix


def test_local_ray_cases_in_a_private_network():
  """tests/ray_local_cases.py, run by pytest inside `unshare -n` (only loopback exists)."""
  prefix = _private_network()
  tests = Path(__file__).resolve().parent
  start = time.time()
  done = private_network.run(
      [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider',
       str(tests / 'ray_local_cases.py')], prefix, timeout_s=720, cwd=str(tests.parent))
  print(done.output[-6000:])
  print(f'local Ray cases: {time.time() - start:.1f} s')
  assert done.returncode == 0, done.output[-12000:]
  assert ' skipped' not in done.output.splitlines()[-1], done.output[-3000:]
  assert done.leftover_pids == []


# -- A two-node cluster on loopback, in a network namespace of its own. ------------------------

CLUSTER_SCRIPT = r"""
set -u
export RAY_USAGE_STATS_ENABLED=0
# Token authentication (Ray >= 2.52; older Ray ignores these) with this test's own token.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$TOKEN"
# Notice the killed node within seconds (defaults: tens of seconds).
export RAY_health_check_period_ms=500 RAY_health_check_timeout_ms=1000
export RAY_health_check_failure_threshold=3
"$RAY" start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=2 \
    --resources='{"node_a": 1}' --include-dashboard=false --temp-dir="$WORK/a" \
    --disable-usage-stats > "$WORK/node_a.log" 2>&1 || exit 21
# The second node needs its own temp dir and dashboard-agent port (the rest are picked free).
"$RAY" start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-cpus=1 \
    --resources='{"node_b": 1}' --temp-dir="$WORK/b" --dashboard-agent-listen-port=52366 \
    --disable-usage-stats > "$WORK/node_b.log" 2>&1 || exit 22
"$PYTHON" "$DRIVER" --work "$WORK" --address 127.0.0.1:6379 --run-dir "$RUN_DIR" \
    --kill-at-step 2 --timeout 100 > "$WORK/driver.log" 2>&1
"""


def test_two_node_cluster_survives_losing_a_node(tiny_npz, tmp_path):
  prefix = _private_network()
  cfg = _cfg(tiny_npz, steps=16, eval_every=4, checkpoint_every=4)
  _inprocess(cfg, tmp_path / 'inprocess')
  run_dir = tmp_path / 'cluster-run'
  # Ray's socket paths must stay under 108 bytes: a short folder in /tmp, not tmp_path.
  work = Path(tempfile.mkdtemp(prefix='ntkdd-ray-', dir='/tmp'))
  (work / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg)))
  (work / 'cluster.sh').write_text(CLUSTER_SCRIPT)
  env = dict(os.environ, WORK=str(work), RUN_DIR=str(run_dir), PYTHON=sys.executable,
             RAY=str(Path(sys.executable).parent / 'ray'),
             DRIVER=str(Path(__file__).parent / 'ray_two_node_driver.py'),
             TOKEN=secrets.token_hex(32))
  env.pop('RAY_ADDRESS', None)
  start = time.time()
  try:
    # Every process left in the namespace (both nodes) is killed by pid when the script ends.
    done = private_network.run(['bash', str(work / 'cluster.sh')], prefix, timeout_s=160,
                               env=env)
    logs = '\n'.join(f'--- {p.name} ---\n' + p.read_text(errors='replace')[-3000:]
                     for p in sorted(work.glob('*.log')))
    assert done.returncode == 0, f'cluster script ended with {done.returncode}\n{logs}'
    report = json.loads((work / 'report.json').read_text())
    assert 'error' not in report, report['error'] + logs
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(f"two-node test: {time.time() - start:.1f} s (driver {report['seconds']:.1f} s, node "
        f"B killed at step {report['killed_at_step']}, {len(report['killed'])} processes; "
        f"worker 1's last error: {report.get('status_final', {}).get('workers', [{}, {}])[1]}")
  assert done.leftover_pids == []
  assert report['nodes'] == ['a', 'b']
  assert report['worker_nodes'] == ['a', 'b'] and report['coordinator_node'] == 'a'
  # The worker pids really are processes of those nodes (under their raylets).
  assert report['worker_on_node_a'] == {'0': True, '1': False}
  assert report['worker_on_node_b'] == {'0': False, '1': True}
  assert report['worker_pids']['1'] in report['killed']
  assert report['killed_at_step'] < 16, 'the run finished before node B was killed'
  assert report['result']['ok'], report['result']
  backend = report['result']['backend']
  assert backend['index_blocks'] > 0 and backend['pixel_fallback_blocks'] == 0, backend
  assert all(len(w['datasets']) == 2 for w in backend['workers'])   # node B's worker too
  assert _steps(run_dir) == list(range(17))
  _assert_same_support(tmp_path / 'inprocess', run_dir)
  # Status saw the fault: worker 1 went down (and stays down: its node is gone).
  after_kill, final = report['status_after_kill'], report['status_final']
  assert after_kill['phase'] == 'running' and not after_kill['workers'][1]['alive']
  assert final['phase'] == 'done' and final['step'] == 16
  assert final['workers'][1]['failures'] >= 1 and not final['workers'][1]['alive']
  assert final['workers'][1]['last_error']
  assert final['workers'][0]['alive'] and final['workers'][0]['failures'] == 0
