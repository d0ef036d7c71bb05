"""The Ray launch type: kernel workers and the coordinator as actors on a Ray cluster.

The unchanged `KernelWorker` and `server.coordinator.Coordinator` classes run as Ray actors:

* One `KernelWorker` actor per worker, spread over the cluster's nodes (or placed by custom
  resources, `worker_resources`), each asking for `worker_cpus` CPUs and one GPU where the
  cluster has GPUs. `max_restarts=-1`: a worker whose process dies is restarted by Ray (with
  empty caches; the coordinator's stale-cache logic re-sends the images). `max_task_retries=0`:
  a call lost with its worker is not replayed by Ray; the coordinator re-queues the block.
* `RayWorkerHandle` wraps each worker actor with the four worker methods, each a `ray.get` with
  a timeout, raising when the actor is dead, restarting or late, which marks the worker down in
  `DistributedKernels`; it is pinged again later and used when it answers.
* The coordinator is a named actor, `ntkdd-coordinator-<run name>` in namespace 'ntkdd' (the
  run name defaults to the run directory's basename), pinned to the driver's node because it
  writes the run directory there, and threaded (`max_concurrency`), so `status()` answers
  while `run()` runs. `ntkdd status --ray-address ADDRESS --run NAME` asks it.
* Every actor is owned by the driver (`ntkdd distill`): if the driver dies, Ray ends them too.
  `run_ray` kills them at the end of the run.

What is not graceful: Ray runs the coordinator's `run()` off its process's main thread, where
the distill loop cannot install its SIGTERM/SIGINT handler, so Ctrl-C of the driver kills the
coordinator instead of letting it checkpoint its current step. The run continues with
--resume from its last periodic checkpoint (--checkpoint-every).

Files in the run directory besides distill's: ray_address.txt (the cluster's address, then the
run name), coordinator_result.json and worker_pids.json (server/coordinator.py). Connecting to a
cluster, and ending actors: launch/ray_cluster.py.

Authentication: whoever reaches a Ray cluster's ports can run code on it unless it requires a
token (Ray >= 2.52, RAY_AUTH_MODE=token; off by default). Keep the cluster on loopback or a
private network either way. Ray Client addresses (ray://) are not supported for distillation:
the coordinator must share a node, and so the run directory, with the `ntkdd` command.
"""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ntkdd.launch import nodes, ray_cluster
from ntkdd.launch.ray_cluster import NAMESPACE, import_ray
from ntkdd.server import coordinator, distributed_kernels, status as status_lib
from ntkdd.server import run_dir as run_dir_lib
from ntkdd.server.run_dir import RAY_ADDRESS_FILE
from ntkdd.server.coordinator import CoordinatorFailed   # what this launch type raises
from ntkdd.workers import protocol

COORDINATOR_PREFIX = 'ntkdd-coordinator-'
WORKER_PREFIX = 'ntkdd-worker-'


# -- Kernel workers. ----------------------------------------------------------------------------

class RayWorkerHandle(protocol.WorkerHandle):
  """A `KernelWorker` actor called like a local worker: bytes/ints/strs in, bytes out.

  Each method waits for its answer with `ray.get(..., timeout)` and raises when the actor has
  died, is restarting past the timeout, or is late, so `DistributedKernels` marks the worker
  down and re-queues its blocks. Picklable: the coordinator actor receives these handles.
  """

  def __init__(self, actor: Any, name: str = 'worker', call_timeout_s: float = 600.0,
               ping_timeout_s: float = 30.0):
    self.actor = actor
    self.name = name
    self.call_timeout_s = float(call_timeout_s)
    self.ping_timeout_s = float(ping_timeout_s)

  def __repr__(self) -> str:
    return f'RayWorkerHandle({self.name!r})'

  def _call(self, method: str, timeout_s: float, *args) -> bytes:
    ray = import_ray()
    ref = getattr(self.actor, method).remote(*args)
    try:
      return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
      # Drop the call if it still waits for a restarting actor, so pings do not pile up there.
      try:
        ray.cancel(ref)
      except Exception:  # already running or finished: it ends on its own
        pass
      raise TimeoutError(f'{self.name}.{method}: no answer within {timeout_s:g} s') from None

  def wait_ready(self, timeout_s: float) -> bytes:
    """Its ping, waiting up to `timeout_s` for Ray to place and start the actor."""
    try:
      return self._call(protocol.PING, timeout_s)
    except TimeoutError:
      ray = import_ray()
      raise TimeoutError(f'Ray needs a node with the resources each worker asks for; the '
                         f'cluster has {ray.available_resources()} available of '
                         f'{ray.cluster_resources()}.') from None

  def ping(self) -> bytes:
    return self._call(protocol.PING, self.ping_timeout_s)

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    return self._call(protocol.SET_IMAGES, self.call_timeout_s, name, version, payload)

  def kernel_block(self, request: bytes) -> bytes:
    return self._call(protocol.KERNEL_BLOCK, self.call_timeout_s, request)

  def vjp_block(self, request: bytes) -> bytes:
    return self._call(protocol.VJP_BLOCK, self.call_timeout_s, request)


def _actor_env(env: Optional[dict]) -> dict:
  return {'env_vars': nodes.node_env(env)}


def start_worker_actors(arch, workers: int, dtype: str = 'float32', tile: Optional[int] = None,
                        name_prefix: Optional[str] = None, worker_kwargs: Optional[dict] = None,
                        worker_cpus: float = 1, worker_gpus: Optional[float] = None,
                        worker_resources: Optional[Sequence[dict]] = None,
                        env: Optional[dict] = None, max_concurrency: int = 4) -> list:
  """Creates `workers` named `KernelWorker` actors; does not wait for them.

  Args:
    arch, dtype, tile: the workers' architecture (or its dict), dtype and kernel tile.
    workers: how many actors.
    name_prefix: the actors' names are this plus their index (default: a random prefix).
    worker_kwargs: further `KernelWorker` arguments (e.g. a dataset spec for workers that load
      the data).
    worker_cpus: CPUs each actor asks for.
    worker_gpus: GPUs each actor asks for; None: one if the cluster has GPUs, else none.
    worker_resources: custom resources per worker, cycled (e.g. [{'node_a': 1},
      {'node_b': 1}] places worker 0 on the node offering node_a); without them the workers
      are spread over the nodes.
    env: extra environment variables of the actors.
    max_concurrency: threads per actor (a ping answers while blocks compute).

  Returns:
    The actor handles, in worker order (`worker_handles` wraps them for the coordinator).
  """
  ray = import_ray()
  from ntkdd.workers import kernel_worker
  if workers < 1:
    raise ValueError(f'--workers must be >= 1 with --launch ray, got {workers}.')
  if worker_gpus is None:
    worker_gpus = 1 if ray.cluster_resources().get('GPU', 0) >= 1 else 0
  prefix = name_prefix or f'{WORKER_PREFIX}{uuid.uuid4().hex[:8]}-'
  actor_class = ray.remote(kernel_worker.KernelWorker)
  actors = []
  try:
    for i in range(workers):
      options: dict = dict(
          name=f'{prefix}{i}', namespace=NAMESPACE, num_cpus=worker_cpus, num_gpus=worker_gpus,
          max_restarts=-1, max_task_retries=0,
          # The coordinator keeps up to two blocks in flight per worker (its default); more
          # threads let a ping answer while both compute. KernelWorker is thread-safe.
          max_concurrency=max_concurrency, runtime_env=_actor_env(env))
      if worker_resources:
        options['resources'] = dict(worker_resources[i % len(worker_resources)])
      else:
        options['scheduling_strategy'] = 'SPREAD'
      try:
        actor = actor_class.options(**options).remote(
            nodes.arch_dict(arch), dtype, tile, worker_id=i, **(worker_kwargs or {}))
      except ValueError as e:  # the name is taken: another run of the same name is up
        raise ValueError(f'Cannot create Ray actor {options["name"]!r} in namespace '
                         f'{NAMESPACE!r}: {e}') from e
      actors.append(actor)
  except BaseException:
    ray_cluster.kill_actors(actors)
    raise
  return actors


def worker_handles(actors: Sequence, call_timeout_s: float = 600.0,
                   ping_timeout_s: float = 30.0) -> list[RayWorkerHandle]:
  """A `RayWorkerHandle` per worker actor, named 'worker <index>'."""
  return [RayWorkerHandle(a, name=f'worker {i}', call_timeout_s=call_timeout_s,
                          ping_timeout_s=ping_timeout_s) for i, a in enumerate(actors)]


# -- The distillation: the coordinator actor. ---------------------------------------------------

def default_run_name(run_dir: Union[str, Path]) -> str:
  return Path(run_dir).resolve().name


def coordinator_name(run_name: str) -> str:
  return f'{COORDINATOR_PREFIX}{run_name}'


def write_address_file(run_dir: Path, address: str, run_name: str) -> None:
  run_dir_lib.write_text(Path(run_dir) / RAY_ADDRESS_FILE, f'{address}\n{run_name}\n')


def read_address_file(run_dir: Union[str, Path]) -> tuple[str, str]:
  """(cluster address, run name) from a run directory's ray_address.txt."""
  path = Path(run_dir) / RAY_ADDRESS_FILE
  try:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  except OSError:
    raise status_lib.StatusQueryError(f'{run_dir} has no {RAY_ADDRESS_FILE}: no Ray run has '
                                      f'started there.') from None
  if len(lines) < 2:
    raise status_lib.StatusQueryError(f'{path} should hold the Ray address and the run name.')
  return lines[0], lines[1]


class RayRun:
  """A distillation whose coordinator and workers are Ray actors; `stop()` kills them all.

  Made by `start_ray`. Use as a context manager, or call `stop()` in a `finally`.
  """

  def __init__(self, coordinator: Any, workers: list, run_ref: Any, run_dir: Path,
               run_name: str, address: str, connected_here: bool):
    self.coordinator, self.workers, self.run_ref = coordinator, workers, run_ref
    self.run_dir, self.run_name, self.address = Path(run_dir), run_name, address
    self._connected_here = connected_here
    self._stopped = False

  @property
  def coordinator_name(self) -> str:
    return coordinator_name(self.run_name)

  def running(self) -> bool:
    ray = import_ray()
    ready, _ = ray.wait([self.run_ref], timeout=0)
    return not ready

  def status(self, timeout_s: float = 10.0) -> dict:
    """The coordinator's status snapshot (as `ntkdd status` prints it)."""
    ray = import_ray()
    return status_lib.decode(ray.get(self.coordinator.status.remote(), timeout=timeout_s))

  def wait(self, timeout_s: Optional[float] = None, poll_s: float = 0.2) -> dict:
    """Waits for the coordinator's run() to end; its coordinator_result.json as a dict."""
    ray = import_ray()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
      ready, _ = ray.wait([self.run_ref], timeout=poll_s)
      if ready:
        break
      if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f'The Ray run did not finish within {timeout_s:g} s.')
    try:
      ray.get(self.run_ref)
    except ray.exceptions.RayError as e:
      raise CoordinatorFailed(
          f'The coordinator actor ended without a result ({type(e).__name__}: {e}). The '
          f'checkpoint in {self.run_dir} is kept: continue with --resume.') from e
    result = coordinator.read_result(self.run_dir)
    if result is None:
      raise CoordinatorFailed(f'The coordinator finished without a readable '
                              f'{self.run_dir / run_dir_lib.COORDINATOR_RESULT}.')
    return result

  def stop(self) -> None:
    """Kills the coordinator, then the workers; disconnects if `start_ray` connected."""
    if self._stopped:
      return
    self._stopped = True
    try:
      ray_cluster.kill_actors([self.coordinator] + list(self.workers))
    finally:
      if self._connected_here:
        import_ray().shutdown()

  def __enter__(self) -> 'RayRun':
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def start_ray(cfg, run_dir: str, workers: int, ray_address: Optional[str] = None,
              resume: bool = False, block: Optional[int] = 64, worker_tile: Optional[int] = None,
              deadline_s: float = 600.0, startup_timeout_s: float = 300.0,
              run_name: Optional[str] = None, worker_kwargs: Optional[dict] = None,
              worker_cpus: float = 1, worker_gpus: Optional[float] = None,
              worker_resources: Optional[Sequence[dict]] = None, env: Optional[dict] = None,
              coordinator_kwargs: Optional[dict] = None, local_cpus: Optional[int] = None,
              ping_timeout_s: float = 30.0) -> RayRun:
  """Starts the distillation on Ray (workers, then the coordinator's run()); does not wait.

  Each worker loads the run's dataset itself (`cfg.data_spec()`, from the same --data-dir path
  on its node), so target and test rows go to it as indices; a worker that cannot load it is
  sent pixels.

  Args:
    cfg: a `DistillConfig` (KIP, LS) or a `jobs.RcigJob`.
    run_dir: the run directory (on this node: the coordinator actor runs here and writes it).
    workers: how many worker actors.
    ray_address: the cluster (see `ray_cluster.connect`).
    resume, block, deadline_s, startup_timeout_s, coordinator_kwargs: for the coordinator
      (`coordinator.Coordinator`); `deadline_s` also bounds each worker call.
    worker_tile: the workers' kernel tile (default cfg.tile).
    run_name: the run's name on the cluster (default: the run directory's basename).
    worker_kwargs: add to or override the `KernelWorker` arguments (dataset=None: always
      pixels).
    worker_cpus, worker_gpus, worker_resources, env: as `start_worker_actors`.
    local_cpus: CPUs of a private local Ray, if one is started.
    ping_timeout_s: how long a worker's ping may take before it counts as down.

  Returns:
    The running `RayRun`; its `wait()` gives the result, `stop()` kills its actors.

  Raises:
    CoordinatorFailed: a worker did not start within `startup_timeout_s`.
    ValueError: a Ray Client address, or a run of the same name already on the cluster.
  """
  ray = import_ray()
  from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
  from ntkdd.server import jobs
  cfg.validate()
  if workers < 1:
    raise ValueError(f'--workers must be >= 1 with --launch ray, got {workers}.')
  if ray_address and ray_address.startswith('ray://'):
    raise ValueError('--launch ray distils with a driver on a cluster node (--ray-address auto or '
                     'HOST:PORT of the GCS), not through Ray Client (ray://): the coordinator '
                     'writes --out on the driver\'s node. Run ntkdd on the head node, or submit '
                     'it with `ray job submit`.')
  run_dir = coordinator.open_run_dir(run_dir, resume, coordinator.STALE_FILES + (RAY_ADDRESS_FILE,))
  run_name = run_name or default_run_name(run_dir)
  connected_here = ray_cluster.connect(ray_address, local_cpus)
  actors: list = []
  try:
    address = ray_cluster.cluster_address()
    name = coordinator_name(run_name)
    write_address_file(run_dir, address, run_name)
    logging.info('Ray cluster at %s; run %r (actor %s in namespace %s). Status: ntkdd status '
                 '--ray-address %s --run %s', address, run_name, name, NAMESPACE, address,
                 run_name)
    actors = start_worker_actors(
        cfg.architecture(), workers, cfg.dtype, worker_tile if worker_tile is not None else
        cfg.tile, name_prefix=f'{WORKER_PREFIX}{run_name}-',
        worker_kwargs={'dataset': cfg.data_spec().to_dict(), **(worker_kwargs or {})},
        worker_cpus=worker_cpus, worker_gpus=worker_gpus, worker_resources=worker_resources,
        env=env)
    handles = worker_handles(actors, call_timeout_s=deadline_s, ping_timeout_s=ping_timeout_s)
    try:
      coordinator_actor = ray.remote(coordinator.Coordinator).options(
          name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
          # run() holds one thread for the whole run; status() and ping() need others.
          max_concurrency=4,
          scheduling_strategy=NodeAffinitySchedulingStrategy(
              ray.get_runtime_context().get_node_id(), soft=False),
          runtime_env=_actor_env(env)).remote(
              jobs.to_dict(cfg), str(run_dir), bool(resume), handles, block=block,
              deadline_s=deadline_s, startup_timeout_s=startup_timeout_s,
              coordinator_kwargs=coordinator_kwargs)
    except ValueError as e:  # the name is taken
      raise ValueError(f'A run named {run_name!r} is already on this Ray cluster (actor {name} '
                       f'in namespace {NAMESPACE}): {e}. Choose another --out directory name.'
                       ) from e
    actors.insert(0, coordinator_actor)
    # The workers import JAX first: the coordinator runs once they all answer, so the run's
    # start-up errors reach this process. Its status() answers meanwhile ('starting').
    for i, answer in enumerate(coordinator.wait_for_workers(handles, startup_timeout_s)):
      if answer.get('dataset_error'):
        logging.warning('Kernel worker %d could not load the dataset on its node (%s); it '
                        'will be sent pixels.', i, answer['dataset_error'])
    run_ref = coordinator_actor.run.remote()
  except BaseException:
    ray_cluster.kill_actors(actors)
    if connected_here:
      ray.shutdown()
    raise
  return RayRun(coordinator_actor, actors[1:], run_ref, run_dir, run_name, address, connected_here)


def run_ray(cfg, run_dir: str, workers: int, ray_address: Optional[str] = None,
            resume: bool = False, block: Optional[int] = 64, timeout_s: Optional[float] = None,
            **kwargs) -> dict:
  """Runs `ntkdd distill --launch ray --workers N`: starts, waits, kills every actor.

  Returns the summary dict (as `distill.distill`). Raises `distill.Interrupted` on Ctrl-C (the
  last periodic checkpoint stays for --resume), `CoordinatorFailed` with the coordinator's
  error, and `TimeoutError` past `timeout_s`. Other keyword arguments go to `start_ray`.
  """
  from ntkdd.server import distill
  run = start_ray(cfg, run_dir, workers, ray_address=ray_address, resume=resume, block=block,
                  **kwargs)
  try:
    try:
      result = run.wait(timeout_s)
    except KeyboardInterrupt:
      raise distill.Interrupted(
          f'Stopped by Ctrl-C. The last checkpoint in {run_dir} (every --checkpoint-every '
          f'steps) is kept: continue with the same command plus --resume.') from None
  finally:
    run.stop()
  return coordinator.summary_of(result)


# -- Status from any process that reaches the cluster. ------------------------------------------

# -- Kernel workers for a caller that coordinates itself (`ntkdd kernel`). ----------------------

class RayKernels(distributed_kernels.OwnedWorkersKernels):
  """`DistributedKernels` over Ray `KernelWorker` actors; close() kills the actors.

  Arguments as `start_ray`'s where they share a name; `call_timeout_s` bounds each block call.
  """

  def __init__(self, arch, workers: int, ray_address: Optional[str] = None,
               tile: Optional[int] = None, dtype: str = 'float32', block: Optional[int] = 64,
               startup_timeout_s: float = 300.0, worker_kwargs: Optional[dict] = None,
               worker_cpus: float = 1, worker_gpus: Optional[float] = None,
               worker_resources: Optional[Sequence[dict]] = None, env: Optional[dict] = None,
               local_cpus: Optional[int] = None, call_timeout_s: float = 600.0,
               ping_timeout_s: float = 30.0, dataset: Optional[dict] = None,
               **coordinator_kwargs):
    if workers < 1:
      raise ValueError(f'--workers must be >= 1 with --launch ray, got {workers}.')
    self._connected_here = ray_cluster.connect(ray_address, local_cpus)
    self.actors: list = []
    self._backend = None
    try:
      if dataset is not None:
        worker_kwargs = {'dataset': dataset, **(worker_kwargs or {})}
      self.actors = start_worker_actors(arch, workers, dtype, tile, worker_kwargs=worker_kwargs,
                                        worker_cpus=worker_cpus, worker_gpus=worker_gpus,
                                        worker_resources=worker_resources, env=env)
      handles = worker_handles(self.actors, call_timeout_s, ping_timeout_s)
      coordinator.wait_for_workers(handles, startup_timeout_s)
      self._backend = distributed_kernels.DistributedKernels(handles, block=block, dtype=dtype,
                                                             **coordinator_kwargs)
    except BaseException:
      self._release()
      raise

  def _release(self) -> None:
    ray_cluster.kill_actors(self.actors)
    self.actors = []
    if self._connected_here:
      self._connected_here = False
      import_ray().shutdown()


def make_ray_backend(arch, workers: int, ray_address: Optional[str] = None,
                     tile: Optional[int] = None, dtype: str = 'float32', block: Optional[int] = 64,
                     **kwargs) -> RayKernels:
  """The backend factory of `--launch ray` where this process coordinates (`ntkdd kernel`).

  `dataset` (a `DataSpec` dict): each worker loads it itself, so target rows go as indices.
  """
  return RayKernels(arch, workers, ray_address=ray_address, tile=tile, dtype=dtype, block=block,
                    **kwargs)
