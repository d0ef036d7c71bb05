"""The Ray launch type on a private local Ray: same results as in-process, status, a restart.

Not collected by a plain `pytest tests`: tests/test_ray.py runs this file with pytest inside a
network namespace of its own (`unshare -n`), where only loopback exists, because a local Ray
advertises the machine's non-loopback address. Outside such a namespace every test here skips.
The tests share one private Ray started in this process (2 CPUs), shut down after them.
"""
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

import numpy as np
import pytest

ray = pytest.importorskip('ray')

from ntkdd.common import architectures  # noqa: E402
from ntkdd.launch import cli, inprocess, private_network, ray_cluster, ray_launch, ray_status  # noqa: E402
from ntkdd.launch import status_client  # noqa: E402
from ntkdd.server import status  # noqa: E402
from run_helpers import BLOCK, TIMEOUT_S, wait_for  # noqa: E402
from run_helpers import assert_same_support as _assert_same_support  # noqa: E402
from run_helpers import last_step as _last_step, steps as _steps  # noqa: E402
from run_helpers import tiny_cfg as _cfg  # noqa: E402

TINY_FLAGS = ['--data-dir', '.', '--ipc', '2', '--steps', '4', '--arch', 'fc', '--depth', '1',
              '--target-batch', '12', '--eval-every', '2', '--checkpoint-every', '2', '--lr',
              '0.05', '--seed', '3', '--workers', '2', '--block', str(BLOCK), '--no-progress']


def _actor_gone(name):
  try:
    ray.get_actor(name, namespace=ray_cluster.NAMESPACE)
  except ValueError:
    return True
  return False


def _assert_actors_gone(run_name, workers):
  names = [ray_launch.coordinator_name(run_name)] + [
      f'{ray_launch.WORKER_PREFIX}{run_name}-{i}' for i in range(workers)]
  wait_for(lambda: all(_actor_gone(n) for n in names), 30, f'actors {names} to end',
           poll_s=0.05)


def _status_command(*args):
  """`ntkdd status ARGS` in a separate process: (exit code, stdout, stderr)."""
  out = subprocess.run([sys.executable, '-m', 'ntkdd.launch.cli', 'status', *args],
                       capture_output=True, text=True, timeout=120)
  return out.returncode, out.stdout, out.stderr


def _run_details(run, run_dir):
  """What to show when a run ended early: its last step and the coordinator's result."""
  def details():
    result = run_dir / 'coordinator_result.json'
    return (f'last step {_last_step(run_dir)}; coordinator result: '
            f'{result.read_text()[-3000:] if result.exists() else "none"}')
  return details


# -- A private local Ray in this process. -------------------------------------------------------

@pytest.fixture(scope='class')
def local_ray():
  if not private_network.only_loopback():
    pytest.skip('runs inside a private network namespace (tests/test_ray.py starts it): a '
                'local Ray would advertise this machine\'s non-loopback address')
  # Ray >= 2.52 may turn token authentication on for a local cluster and then writes a token
  # to ~/.ray/auth_token unless one is given: give one (the status processes inherit it).
  saved = {k: os.environ.get(k) for k in ('RAY_AUTH_TOKEN', 'RAY_AUTH_MODE')}
  os.environ['RAY_AUTH_TOKEN'] = secrets.token_hex(32)
  # Ray's session (logs, sockets) in a folder of our own, removed after; socket paths must stay
  # under 108 bytes, hence /tmp rather than pytest's tmp_path.
  temp_dir = tempfile.mkdtemp(prefix='ntkdd-ray-', dir='/tmp')
  ray.init(address='local', num_cpus=2, include_dashboard=False, logging_level='WARNING',
           _temp_dir=temp_dir, _node_ip_address='127.0.0.1')
  try:
    address = ray_cluster.cluster_address()
    assert address.startswith('127.0.0.1:'), address
    yield address
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
          snapshots.append(ray_status.query_ray_status(None, 'ray-run', timeout_s=5))
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
    # The coordinator actor left its final status in the run directory as well.
    final = status_client.query_status(str(run_dir))
    assert final['source'] == 'snapshot' and final['phase'] == 'done' and final['step'] == 4
    _assert_actors_gone('ray-run', 2)

  def test_status_from_another_process_and_a_restarted_worker(self, tiny_npz, tmp_path,
                                                              local_ray):
    # More steps than any machine finishes during the test: it stops the run itself, so a fast
    # machine cannot end the run before the killed worker is back.
    steps = 1_000_000
    run_dir = tmp_path / 'long'
    cfg = _cfg(tiny_npz, steps=steps, eval_every=100, checkpoint_every=100)
    run = ray_launch.start_ray(cfg, str(run_dir), workers=2, block=BLOCK, deadline_s=60,
                               ping_timeout_s=10, coordinator_kwargs={'retry_backoff_s': 0.5})
    details = _run_details(run, run_dir)

    def wait(predicate, what):
      return wait_for(predicate, TIMEOUT_S, what, running=run.running, poll_s=0.05,
                      details=details)

    try:
      wait(lambda: _last_step(run_dir) >= 1, 'step 1')
      start = time.time()
      code, out, err = _status_command('--ray-address', local_ray, '--run', 'long', '--json')
      print(f'status query process: {time.time() - start:.1f} s')
      assert code == 0, err[-3000:]
      snap = json.loads(out)
      assert snap['phase'] == 'running', snap
      assert 1 <= snap['step'] < steps and snap['total_steps'] == steps
      assert snap['loss'] is not None and snap['initial_accuracy'] is not None
      assert len(snap['workers']) == 2 and snap['alive_workers'] == 2
      pids = json.loads((run_dir / 'worker_pids.json').read_text())
      assert snap['coordinator_pid'] == pids['coordinator']
      assert {w['pid'] for w in snap['workers']} == set(pids['workers'].values())
      # The table, by run directory (ray_address.txt names the cluster and the run).
      code, out, err = _status_command('--ray-address', str(run_dir))
      assert code == 0, err[-3000:]
      assert f'/{steps}' in out and 'workers: 2, 2 alive' in out and 'run long' in out
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

      w = wait(back_up, 'worker 1 to restart and answer')
      blocks = w['blocks_done']
      wait(lambda: run.status()['workers'][1]['blocks_done'] > blocks,
           'the restarted worker to compute blocks')
      assert _last_step(run_dir) > killed_at
      assert run.running()
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

  def test_rcig_on_the_coordinator_actor_matches_inprocess(self, tiny_npz, tmp_path, local_ray):
    """`--launch ray --algorithm rcig`: the RCIG loop runs in the coordinator actor, the
    worker actors serve the ConvNet NTK of its KRR evaluation."""
    from run_helpers import metrics, run_rcig_inprocess, tiny_rcig_job
    pytest.importorskip('optax')
    job = tiny_rcig_job(tiny_npz)
    reference = run_rcig_inprocess(job, tmp_path / 'inprocess')
    run_dir = tmp_path / 'ray-rcig'
    summary = ray_launch.run_ray(job, str(run_dir), workers=2, block=BLOCK, deadline_s=60,
                                 timeout_s=TIMEOUT_S)
    assert summary['algorithm'] == 'rcig' and summary['steps'] == 4
    assert summary['krr_test_accuracy_after'] == reference['krr_test_accuracy_after']
    _assert_same_support(tmp_path / 'inprocess', run_dir)
    got, want = metrics(run_dir), metrics(tmp_path / 'inprocess')
    for key in ('step', 'loss', 'test_accuracy', 'krr_test_accuracy'):
      assert [r.get(key) for r in got] == [r.get(key) for r in want], key
    assert [r['step'] for r in got if 'krr_test_accuracy' in r] == [0, 2, 4]
    result = json.loads((run_dir / 'coordinator_result.json').read_text())
    assert result['ok'] and all(w['blocks_done'] > 0 for w in result['backend']['workers'])
    final = status_client.query_status(str(run_dir))
    assert final['source'] == 'snapshot' and final['phase'] == 'done' and final['step'] == 4
    assert final['last_krr_accuracy'] == reference['krr_test_accuracy_after']
    _assert_actors_gone('ray-rcig', 2)

  def test_no_address_joins_the_running_cluster(self, tiny_npz, tmp_path, local_ray):
    env = dict(os.environ, RAY_ADDRESS=local_ray)
    done = _distill_without_address(tiny_npz, tmp_path / 'joined', env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f'using the running cluster at {local_ray} (RAY_ADDRESS)' in done.stderr, done.stderr
    assert (tmp_path / 'joined' / 'ray_address.txt').read_text().split() == [local_ray, 'joined']
    assert _steps(tmp_path / 'joined') == list(range(5))


# -- --launch ray without --ray-address and no cluster: a private Ray for the command. ------

def _distill_without_address(tiny_npz, run_dir, env):
  """`ntkdd distill --launch ray` with no --ray-address, in a separate process."""
  return subprocess.run(
      [sys.executable, '-m', 'ntkdd.launch.cli', 'distill', '--dataset', tiny_npz, *TINY_FLAGS,
       '--launch', 'ray', '--out', str(run_dir)],
      capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def test_no_address_and_no_cluster_starts_a_private_ray(tiny_npz, tmp_path):
  if not private_network.only_loopback():
    pytest.skip('runs inside a private network namespace (tests/test_ray.py starts it)')
  # Ray's temp dir of its own: no `ray start` cluster file from anything else on the machine.
  ray_tmp = tempfile.mkdtemp(prefix='ntkdd-ray-', dir='/tmp')
  env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_AUTH_TOKEN=secrets.token_hex(32))
  env.pop('RAY_ADDRESS', None)
  try:
    done = _distill_without_address(tiny_npz, tmp_path / 'private', env)
  finally:
    shutil.rmtree(ray_tmp, ignore_errors=True)
  assert done.returncode == 0, done.stderr[-4000:]
  assert 'no running cluster' in done.stderr and 'private local Ray' in done.stderr, done.stderr
  assert _steps(tmp_path / 'private') == list(range(5))
  address = (tmp_path / 'private' / 'ray_address.txt').read_text().split()[0]
  assert address.startswith('127.0.0.1:'), address

