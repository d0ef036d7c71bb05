"""The Ray launch type: same results as in-process, status from the named actor, faults, 2 nodes.

The local tests share one private Ray started in this process (2 CPUs), shut down after them.
The two-node test runs a real cluster (`ray start` twice: a head and a second node) in a network
namespace of its own where only loopback exists, so nothing listens beyond this machine;
it kills every process of that namespace by pid when it ends. Every wait has a timeout.
"""
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip('ray')

from ntkdd.common import architectures  # noqa: E402
from ntkdd.launch import cli, inprocess, ray_launch  # noqa: E402
from ntkdd.server import status  # noqa: E402
from run_helpers import BLOCK, TIMEOUT_S, wait_for  # noqa: E402
from run_helpers import assert_same_support as _assert_same_support  # noqa: E402
from run_helpers import last_step as _last_step, steps as _steps  # noqa: E402
from run_helpers import run_inprocess as _inprocess, tiny_cfg as _cfg  # noqa: E402

TINY_FLAGS = ['--data-dir', '.', '--ipc', '2', '--steps', '4', '--arch', 'fc', '--depth', '1',
              '--target-batch', '12', '--eval-every', '2', '--checkpoint-every', '2', '--lr',
              '0.05', '--seed', '3', '--workers', '2', '--block', str(BLOCK), '--no-progress']


def _wait_for(predicate, timeout_s, what, run=None):
  return wait_for(predicate, timeout_s, what, running=run.running if run else None, poll_s=0.05)


def _actor_gone(name):
  try:
    ray.get_actor(name, namespace=ray_launch.NAMESPACE)
  except ValueError:
    return True
  return False


def _assert_actors_gone(run_name, workers):
  names = [ray_launch.coordinator_name(run_name)] + [
      f'{ray_launch.WORKER_PREFIX}{run_name}-{i}' for i in range(workers)]
  _wait_for(lambda: all(_actor_gone(n) for n in names), 30, f'actors {names} to end')


def _status_command(*args):
  """`ntkdd status ARGS` in a separate process: (exit code, stdout, stderr)."""
  out = subprocess.run([sys.executable, '-m', 'ntkdd.launch.cli', 'status', *args],
                       capture_output=True, text=True, timeout=120)
  return out.returncode, out.stdout, out.stderr


# -- Without a cluster. -------------------------------------------------------------------------

def test_status_needs_an_address(capsys):
  assert cli.main(['status']) == 2
  assert '--ray-address' in capsys.readouterr().err


def test_missing_ray_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'ray', None)   # `import ray` raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'ntkdd\[ray\]'"):
    ray_launch.import_ray()


def test_status_of_an_address_nobody_serves_fails_at_once():
  start = time.monotonic()
  with pytest.raises(status.StatusQueryError, match='No Ray cluster answers at 127.0.0.1:1'):
    ray_launch.query_ray_status('127.0.0.1:1', 'x')
  assert time.monotonic() - start < 10


def test_a_hung_status_query_is_abandoned(monkeypatch):
  monkeypatch.setattr(ray_launch, '_query', lambda *args: time.sleep(30))
  start = time.monotonic()
  with pytest.raises(ray_launch.StatusTimeout, match='within 0.5 s'):
    ray_launch.query_ray_status('127.0.0.1:1', 'x', timeout_s=0.2, connect_timeout_s=0.3)
  assert time.monotonic() - start < 5


# -- A private local Ray in this process. -------------------------------------------------------

@pytest.fixture(scope='class')
def local_ray():
  # Ray >= 2.52 may turn token authentication on for a local cluster and then writes a token
  # to ~/.ray/auth_token unless one is given: give one (the status processes inherit it).
  saved = {k: os.environ.get(k) for k in ('RAY_AUTH_TOKEN', 'RAY_AUTH_MODE')}
  os.environ['RAY_AUTH_TOKEN'] = secrets.token_hex(32)
  # Ray's session (logs, sockets) in a folder of our own, removed after; socket paths must stay
  # under 108 bytes, hence /tmp rather than pytest's tmp_path.
  temp_dir = tempfile.mkdtemp(prefix='ntkdd-ray-', dir='/tmp')
  ray.init(address='local', num_cpus=2, include_dashboard=False, logging_level='WARNING',
           _temp_dir=temp_dir)
  try:
    yield ray_launch.cluster_address()
  finally:
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


class TestLocalRay:

  def test_cli_distill_matches_inprocess(self, tiny_npz, tmp_path, local_ray):
    assert cli.main(['distill', '--dataset', tiny_npz, *TINY_FLAGS,
                     '--out', str(tmp_path / 'inprocess')]) == 0
    run_dir = tmp_path / 'ray-run'
    snapshots, stop = [], threading.Event()

    def poll_status():   # the named coordinator actor answers while run() runs
      while not stop.is_set():
        try:
          snapshots.append(ray_launch.query_ray_status(None, 'ray-run', timeout_s=5))
        except status.StatusQueryError:
          pass
        time.sleep(0.05)

    poller = threading.Thread(target=poll_status, daemon=True)
    poller.start()
    start = time.time()
    try:
      code = cli.main(['distill', '--dataset', tiny_npz, *TINY_FLAGS, '--launch', 'ray',
                       '--ray-address', 'auto', '--out', str(run_dir)])
    finally:
      stop.set()
      poller.join(30)
    print(f'ray run: {time.time() - start:.1f} s, {len(snapshots)} status snapshots')
    assert code == 0
    _assert_same_support(tmp_path / 'inprocess', run_dir)
    assert _steps(run_dir) == list(range(5))
    assert (run_dir / 'ray_address.txt').read_text().split() == [local_ray, 'ray-run']
    result = json.loads((run_dir / 'coordinator_result.json').read_text())
    assert result['ok']
    # Each worker actor loaded the dataset itself: targets and test images went as indices.
    backend = result['backend']
    assert backend['index_blocks'] > 0 and backend['pixel_fallback_blocks'] == 0, backend
    assert all(len(w['datasets']) == 2 for w in backend['workers'])
    assert snapshots and all(s['run_dir'] == str(run_dir) for s in snapshots)
    assert all(s['ray_run'] == 'ray-run' and s['total_steps'] == 4 for s in snapshots)
    running = [s for s in snapshots if s['phase'] == 'running' and s['workers']]
    assert running and all(len(s['workers']) == 2 for s in running)
    _assert_actors_gone('ray-run', 2)

  def test_status_from_another_process_and_a_restarted_worker(self, tiny_npz, tmp_path,
                                                              local_ray):
    run_dir = tmp_path / 'long'
    cfg = _cfg(tiny_npz, steps=300, eval_every=100, checkpoint_every=100)
    run = ray_launch.start_ray(cfg, str(run_dir), workers=2, block=BLOCK, deadline_s=60,
                               ping_timeout_s=10, coordinator_kwargs={'retry_backoff_s': 0.5})
    try:
      _wait_for(lambda: _last_step(run_dir) >= 1, TIMEOUT_S, 'step 1', run)
      start = time.time()
      code, out, err = _status_command('--ray-address', local_ray, '--run', 'long', '--json')
      print(f'status query process: {time.time() - start:.1f} s')
      assert code == 0, err[-3000:]
      snap = json.loads(out)
      assert snap['phase'] == 'running', snap
      assert 1 <= snap['step'] < 300 and snap['total_steps'] == 300
      assert snap['loss'] is not None and snap['initial_accuracy'] is not None
      assert len(snap['workers']) == 2 and snap['alive_workers'] == 2
      pids = json.loads((run_dir / 'worker_pids.json').read_text())
      assert snap['coordinator_pid'] == pids['coordinator']
      assert {w['pid'] for w in snap['workers']} == set(pids['workers'].values())
      # The table, by run directory (ray_address.txt names the cluster and the run).
      code, out, err = _status_command('--ray-address', str(run_dir))
      assert code == 0, err[-3000:]
      assert '/300' in out and 'workers: 2, 2 alive' in out and 'run long' in out
      code, out, err = _status_command('--ray-address', local_ray, '--run', 'nonesuch')
      assert code == 2 and "No run named 'nonesuch'" in err and 'long' in err

      # Kill worker 1's process: Ray restarts the actor (empty caches), the coordinator
      # marks it down, re-queues its blocks, pings it again and uses it once it answers.
      victim = int(pids['workers']['1'])
      os.kill(victim, signal.SIGKILL)
      killed_at = _last_step(run_dir)

      def back_up():
        w = run.status()['workers'][1]
        return w['failures'] >= 1 and w['alive'] and w['pid'] not in (None, victim) and w

      w = _wait_for(back_up, TIMEOUT_S, 'worker 1 to restart and answer', run)
      blocks = w['blocks_done']
      _wait_for(lambda: run.status()['workers'][1]['blocks_done'] > blocks, TIMEOUT_S,
                'the restarted worker to compute blocks', run)
      assert _last_step(run_dir) > killed_at
    finally:
      run.stop()
    _assert_actors_gone('long', 2)

  def test_kernel_backend_matches_inprocess(self, local_ray):
    arch = architectures.Architecture('fc', 1, 2 ** 0.5, 0.1)
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(20, 12)).astype(np.float32)
    x2 = rng.normal(size=(9, 12)).astype(np.float32)
    g = rng.normal(size=(20, 9)).astype(np.float32)
    with ray_launch.make_ray_backend(arch, workers=2, block=BLOCK) as backend:
      actors = list(backend.actors)
      got = backend.kernel(x1, x2), backend.kernel(x1), backend.vjp(x1, x2, g_ntk=g)
      assert backend.status()['alive_workers'] == 2 and len(actors) == 2
    with inprocess.make_inprocess_backend(arch, workers=1, block=BLOCK) as reference:
      want = reference.kernel(x1, x2), reference.kernel(x1), reference.vjp(x1, x2, g_ntk=g)
    for name in ('ntk', 'nngp'):
      np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert backend.actors == []
    for actor in actors:   # close() killed them
      with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.ping.remote(), timeout=30)


# -- A two-node cluster on loopback, in a network namespace of its own. ------------------------

CLUSTER_SCRIPT = r"""
set -u
ip link set lo up || exit 20
readlink /proc/self/ns/net > "$WORK/netns"
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


def _unshare_command():
  """`unshare -n` (or `-rn`, in a user namespace) if this machine allows it, else None."""
  if not shutil.which('unshare') or not shutil.which('ip'):
    return None
  for command in (['unshare', '-n'], ['unshare', '-rn']):
    try:
      if subprocess.run(command + ['ip', 'link', 'set', 'lo', 'up'], capture_output=True,
                        timeout=20).returncode == 0:
        return command
    except (OSError, subprocess.TimeoutExpired):
      continue
  return None


def _namespace_pids(netns: str) -> list:
  """Every process in network namespace `netns` (e.g. 'net:[4026532177]')."""
  pids = []
  for entry in Path('/proc').iterdir():
    if entry.name.isdigit():
      try:
        if os.readlink(entry / 'ns' / 'net') == netns:
          pids.append(int(entry.name))
      except OSError:
        continue
  return pids


def _kill_namespace(netns: str) -> None:
  # `ray stop` would do, but it picks processes by name on the whole machine, other Ray
  # clusters included; the namespace tells exactly which processes are this test's.
  for _ in range(50):
    pids = _namespace_pids(netns)
    if not pids:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.1)


def test_two_node_cluster_survives_losing_a_node(tiny_npz, tmp_path):
  unshare = _unshare_command()
  if unshare is None:
    pytest.skip('needs `unshare -n` (a private network namespace) and `ip`, which this '
                'machine does not allow: Ray would advertise the non-loopback address.')
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
  netns, process = None, None
  try:
    process = subprocess.Popen(unshare + ['bash', str(work / 'cluster.sh')], env=env,
                               start_new_session=True)
    try:
      code = process.wait(timeout=160)
    except subprocess.TimeoutExpired:
      code = 'timeout'
    netns = (work / 'netns').read_text().strip() if (work / 'netns').exists() else None
    logs = '\n'.join(f'--- {p.name} ---\n' + p.read_text(errors='replace')[-3000:]
                     for p in sorted(work.glob('*.log')))
    assert code == 0, f'cluster script ended with {code}\n{logs}'
    report = json.loads((work / 'report.json').read_text())
    assert 'error' not in report, report['error'] + logs
  finally:
    if netns:
      _kill_namespace(netns)
    if process is not None and process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
    remaining = _namespace_pids(netns) if netns else []
    shutil.rmtree(work, ignore_errors=True)
  print(f"two-node test: {time.time() - start:.1f} s (driver {report['seconds']:.1f} s, node "
        f"B killed at step {report['killed_at_step']}, {len(report['killed'])} processes; "
        f"worker 1's last error: {report.get('status_final', {}).get('workers', [{}, {}])[1]}")
  assert remaining == []
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
