"""The Launchpad launch type: kernel workers and the coordinator as Courier nodes (local_mp).

`make_program` builds the Launchpad program: one `lp.CourierNode(KernelWorker, ...)` per worker
in the 'workers' group and one `lp.CourierNode(LaunchpadCoordinator, ...)` in the 'coordinator'
group: the launcher-neutral `server.coordinator.Coordinator` over `CourierWorkerHandle`s of the
workers, which also serves `status()` over Courier. `run_local_mp` runs such a program on this
machine (Launchpad's LOCAL_MULTI_PROCESSING launch type, under a launcher process of its own:
see launch/launchpad_local.py) and returns the run's summary.

* Network: local launches bind every Courier address with `SimpleLocalAddressBuilder`,
  `localhost:<port from portpicker>`, but the Courier server itself listens on `[::]:<port>`
  (and 0.0.0.0): `courier.Server` takes only a port, and the bind address is fixed in its
  compiled `server.so`. Courier rebuilds call arguments through `__reduce__`, so whoever
  reaches a port runs code in that node. The launcher therefore starts under `unshare -n` (see
  launch/private_network.py): the launcher, every node and the coordinator live in a network
  namespace of their own where only loopback exists, and no Courier port exists outside the
  run. Where no namespace can be made, the launch is refused (`PrivateNetworkUnavailable`)
  unless the caller opts in with `expose_courier_ports=True` (`--expose-courier-ports`).
  Status reaches the host through the run directory instead: the coordinator serves it on
  the Unix socket status.sock (mode 0600) and keeps status.json (server/status.py).
* Worker handles: `CourierWorkerHandle.wait_ready` pings through a client with
  `wait_for_ready` (so it waits for workers still importing JAX/TensorFlow); the calls then go
  through a client with `wait_for_ready=False`, so a dead worker fails its call at once instead
  of waiting for it to come back; `DistributedKernels` re-queues its blocks and pings it later.
* Only bytes/ints/strs cross Courier (a numpy argument hangs on this stack).

Files in the run directory besides distill's: coordinator_address.txt (HOST:PORT of status(),
reachable only inside the run's namespace), status.sock and status.json (status from the host),
coordinator_result.json and worker_pids.json (server/coordinator.py), launchpad_processes.json
and launchpad_logs/ (launch/launchpad_local.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from ntkdd.launch import launchpad_local, nodes, private_network
from ntkdd.server import coordinator, distributed_kernels, run_dir as run_dir_lib
from ntkdd.server.coordinator import CoordinatorFailed   # what this launch type raises
from ntkdd.workers import protocol

COORDINATOR, WORKERS = 'coordinator', 'workers'   # the program's node groups
INSTALL_HINT = ("the Launchpad launch type needs dm-launchpad 0.5.2 (with Courier) on Python "
                "3.10: pip install 'ntkdd[launchpad]' -c constraints/launchpad.txt "
                "(make venv-lp builds that environment as .venv-lp).")
EXPOSE_FLAG = '--expose-courier-ports'


class PrivateNetworkUnavailable(RuntimeError):
  """No private network namespace for a local program, and no opt-in to expose its ports."""


def _exposure_warning() -> str:
  return (f'{EXPOSE_FLAG}: the Courier servers of this run listen on every network interface '
          f'of this machine, and Courier executes what its callers send: anyone who can reach '
          f'these ports can run code as user {_user()} while the run lasts.')


def _user() -> str:
  try:
    import pwd  # pylint: disable=import-outside-toplevel
    return pwd.getpwuid(os.getuid()).pw_name
  except (ImportError, KeyError):
    return str(os.getuid())


def network_prefix(expose_courier_ports: bool = False, caller_coordinates: bool = False) -> list:
  """The command prefix that starts a local program's launcher in a private network.

  Args:
    expose_courier_ports: opt out: the ports listen on the host's network (logged as a
      warning).
    caller_coordinates: this process talks to the workers itself (`ntkdd kernel`), so it
      must already be inside a private namespace.

  Returns:
    `unshare -n` (or `-rn`) when this process is on the host's network; [] when it already
    runs in a private namespace of ntkdd's (a CLI that re-ran itself there, a test) or when
    `expose_courier_ports` opts out.

  Raises:
    PrivateNetworkUnavailable: no namespace can be made (the message says why, and how to
      proceed).
  """
  if expose_courier_ports:
    logging.warning(_exposure_warning())
    return []
  if private_network.inside_private_namespace():
    return []
  how = (f'Ways on: run ntkdd as root or enable unprivileged user namespaces '
         f'(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0); use '
         f'--launch ray (its workers authenticate callers) or --launch inprocess --workers N; '
         f'or, only if every host that can reach this machine is trusted, pass {EXPOSE_FLAG}.')
  if caller_coordinates:
    raise PrivateNetworkUnavailable(
        'This process coordinates Launchpad kernel workers over Courier, so it must itself run '
        'in the private network namespace of the program (the ntkdd CLI re-runs itself under '
        '`unshare -n`; from Python, start your program under `unshare -n` and bring up lo). '
        + how)
  prefix, why = private_network.probe_unshare()
  if prefix is None:
    raise PrivateNetworkUnavailable(
        f'The Launchpad launch type runs its nodes in a private network namespace, because a '
        f'Courier server listens on every interface and executes what its callers send; this '
        f'machine cannot make one ({why}). ' + how)
  return prefix


def import_launchpad():
  """The `launchpad` module, or an ImportError that says how to get it."""
  try:
    import launchpad as lp  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'{INSTALL_HINT} ({e})') from e
  return lp


def rerun_in_private_network(argv: Sequence[str]) -> Optional[int]:
  """Re-runs a process that coordinates Launchpad workers itself inside a private network.

  For `ntkdd kernel` or a benchmark: runs the command `argv` (this process's own, typically)
  inside a private network namespace.

  Returns:
    The command's exit code; None when this process already runs in a private namespace and
    may go on.

  Raises:
    PrivateNetworkUnavailable: no namespace can be made here.
  """
  prefix = network_prefix()
  if not prefix:
    return None
  done = private_network.run(list(argv), prefix, timeout_s=None, capture=False,
                             new_session=False)
  return done.returncode if isinstance(done.returncode, int) else 1


# -- The coordinator's side of Courier. ---------------------------------------------------------

class CourierWorkerHandle(protocol.WorkerHandle):
  """A kernel worker's Courier server, called as a `protocol.WorkerHandle`.

  Calls go through a client with `wait_for_ready=False`, made once the worker has answered
  `wait_ready` (or at the first call): a dead worker fails its call at once.
  """

  def __init__(self, address: str, name: Optional[str] = None):
    self.address = address
    self.name = name or address
    self._client = None
    self._lock = threading.Lock()

  def _rpc(self):
    with self._lock:
      if self._client is None:
        import courier  # pylint: disable=import-outside-toplevel
        self._client = courier.Client(self.address, wait_for_ready=False)
      return self._client

  def wait_ready(self, timeout_s: float) -> bytes:
    """Pings through clients that wait for the server (30 s each) until `timeout_s` is up."""
    import courier  # pylint: disable=import-outside-toplevel
    deadline = time.monotonic() + timeout_s
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError(f'its Courier server at {self.address} never answered')
      probe = courier.Client(self.address, call_timeout=min(left, 30.0), wait_for_ready=True)
      try:
        answer = probe.ping()
        break
      except Exception as e:  # not up yet: wait_for_ready waited up to 30 s; try again
        logging.info('Kernel worker at %s not ready yet: %s', self.address, e)
        time.sleep(0.5)
    self._rpc()
    return answer

  def ping(self) -> bytes:
    return self._rpc().ping()

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    return self._rpc().set_images(name, version, payload)

  def kernel_block(self, request: bytes) -> bytes:
    return self._rpc().kernel_block(request)

  def vjp_block(self, request: bytes) -> bytes:
    return self._rpc().vjp_block(request)


class LaunchpadCoordinator(coordinator.Coordinator):
  """`coordinator.Coordinator` as a Launchpad Courier node: `status()` also over Courier.

  Args:
    config, run_dir, resume: as `coordinator.Coordinator`.
    worker_clients: the workers' Courier clients (Launchpad turns the program's worker handles
      into them); the coordinator calls `CourierWorkerHandle`s of their addresses.
    stop_program: call `lp.stop()` at the end, so a plain `lp.launch(...)` of the program ends.
    **kwargs: further `coordinator.Coordinator` arguments (block, deadline_s, ...).
  """

  def __init__(self, config: dict, run_dir: str, resume: bool, worker_clients: Sequence,
               stop_program: bool = True, **kwargs):
    handles = [CourierWorkerHandle(client.address) for client in worker_clients]
    super().__init__(config, run_dir, resume, handles, stop_hook=self._stop, **kwargs)
    self._server = None
    self._stop_program = stop_program

  def set_courier_server(self, server) -> None:
    """Launchpad hands over the server; started before run(), so status() answers while the
    workers start up."""
    self._server = server
    server.Start()
    self.set_address(f'localhost:{server.port}')

  def _stop(self) -> None:
    if self._server is not None:
      self._server.Stop()
    if self._stop_program:
      try:
        import_launchpad().stop()
      except Exception as e:  # not launched by Launchpad (a test), or the launcher is gone
        logging.info('lp.stop() skipped: %s', e)


# -- The program. -------------------------------------------------------------------------------

def add_worker_nodes(program, arch, workers: int, dtype: str = 'float32',
                     tile: Optional[int] = None, dataset: Optional[dict] = None,
                     worker_kwargs: Optional[dict] = None) -> list:
  """Adds `workers` KernelWorker Courier nodes to the program's 'workers' group.

  Args:
    program: the `lp.Program`.
    arch: the architecture (or its dict); dtype, tile: the workers' kernel dtype and tile.
    dataset: a `DataSpec` dict: each worker loads it itself, so targets go as indices.
    worker_kwargs: further `KernelWorker` arguments (JSON values; e.g. pin_core=True).

  Returns:
    The nodes' Courier handles (Launchpad turns them into clients in the nodes given them).
  """
  lp = import_launchpad()
  from ntkdd.workers import kernel_worker
  if workers < 1:
    raise ValueError(f'--workers must be >= 1 with --launch launchpad, got {workers}.')
  handles = []
  with program.group(WORKERS):
    for i in range(workers):
      node = lp.CourierNode(kernel_worker.KernelWorker, nodes.arch_dict(arch), dtype, tile,
                            worker_id=i, dataset=dataset, **(worker_kwargs or {}))
      handles.append(program.add_node(node))
  return handles


def make_program(cfg, run_dir: str, workers: int, resume: bool = False, block: Optional[int] = 64,
                 worker_tile: Optional[int] = None, deadline_s: float = 600.0,
                 startup_timeout_s: float = 300.0, stop_program: bool = True,
                 coordinator_kwargs: Optional[dict] = None, worker_kwargs: Optional[dict] = None):
  """The Launchpad program of a distillation: kernel workers plus the coordinator.

  Args:
    cfg: a `DistillConfig` (KIP, LS) or a `jobs.RcigJob` (the workers serve its KRR
      evaluation's kernel).
    run_dir, resume, block, deadline_s, startup_timeout_s, coordinator_kwargs: for the
      coordinator (`coordinator.Coordinator`).
    workers: how many kernel worker nodes; worker_tile: their kernel tile (default cfg.tile).
    worker_kwargs: further `KernelWorker` arguments (see `add_worker_nodes`).
    stop_program: the coordinator calls `lp.stop()` when the run ends.

  Returns:
    The `lp.Program`, with node groups WORKERS and COORDINATOR.
  """
  lp = import_launchpad()
  from ntkdd.server import jobs
  cfg.validate()
  program = lp.Program('ntkdd-distill')
  tile = worker_tile if worker_tile is not None else cfg.tile
  handles = add_worker_nodes(program, cfg.architecture(), workers, cfg.dtype, tile,
                             dataset=cfg.data_spec().to_dict(), worker_kwargs=worker_kwargs)
  with program.group(COORDINATOR):
    program.add_node(lp.CourierNode(
        LaunchpadCoordinator, jobs.to_dict(cfg), str(run_dir), bool(resume), handles,
        block=block, deadline_s=deadline_s, startup_timeout_s=startup_timeout_s,
        stop_program=stop_program, coordinator_kwargs=coordinator_kwargs))
  return program


def make_worker_program(arch, workers: int, dtype: str = 'float32', tile: Optional[int] = None,
                        dataset: Optional[dict] = None, worker_kwargs: Optional[dict] = None):
  """A program of kernel workers only (the caller coordinates): `ntkdd kernel`."""
  lp = import_launchpad()
  program = lp.Program('ntkdd-workers')
  add_worker_nodes(program, arch, workers, dtype, tile, dataset=dataset,
                   worker_kwargs=worker_kwargs)
  return program


def program_from_spec(spec: dict):
  """The program a launcher spec describes (`start_local_mp`'s or `LaunchpadKernels`')."""
  from ntkdd.common import architectures
  from ntkdd.server import jobs
  if spec['kind'] == 'distill':
    return make_program(jobs.from_dict(spec['config']), spec['run_dir'], spec['workers'],
                        resume=spec['resume'], block=spec['block'],
                        worker_tile=spec['worker_tile'], deadline_s=spec['deadline_s'],
                        startup_timeout_s=spec['startup_timeout_s'],
                        coordinator_kwargs=spec.get('coordinator_kwargs'),
                        worker_kwargs=spec.get('worker_kwargs'))
  return make_worker_program(architectures.Architecture.from_dict(spec['arch']), spec['workers'],
                             spec['dtype'], spec['tile'], dataset=spec.get('dataset'),
                             worker_kwargs=spec.get('worker_kwargs'))


# -- Local runs (local_mp). ---------------------------------------------------------------------

def start_local_mp(cfg, run_dir: str, workers: int, resume: bool = False, block: Optional[int] = 64,
                   worker_tile: Optional[int] = None, deadline_s: float = 600.0,
                   startup_timeout_s: float = 300.0, env: Optional[dict] = None,
                   coordinator_kwargs: Optional[dict] = None,
                   python: Optional[str] = None,
                   expose_courier_ports: bool = False,
                   worker_kwargs: Optional[dict] = None) -> launchpad_local.LocalProgram:
  """Starts the distillation program (local_mp) in a launcher process; does not wait.

  Args:
    cfg: a `DistillConfig` (KIP, LS) or a `jobs.RcigJob`.
    run_dir: the run directory; an existing run needs `resume`.
    workers: how many kernel worker nodes.
    block, worker_tile, deadline_s, startup_timeout_s, coordinator_kwargs: for the coordinator
      and its `DistributedKernels` (see `coordinator.Coordinator`).
    env: extra environment variables of every node.
    python: the interpreter of the launcher (default: this one).
    expose_courier_ports: let the Courier ports listen on the host's network instead of a
      private namespace (see `network_prefix`).
    worker_kwargs: further `KernelWorker` arguments (JSON values; e.g. pin_core=True).

  Returns:
    The running program; `wait_for_result` waits for it, `stop()` ends it.
  """
  import_launchpad()   # fail here, clearly, rather than in the launcher process
  from ntkdd.server import jobs
  cfg.validate()
  if workers < 1:
    raise ValueError(f'--workers must be >= 1 with --launch launchpad, got {workers}.')
  prefix = network_prefix(expose_courier_ports)
  stale = coordinator.STALE_FILES + (run_dir_lib.COORDINATOR_ADDRESS_FILE,)
  run_dir = coordinator.open_run_dir(run_dir, resume, stale)
  spec = {'kind': 'distill', 'config': jobs.to_dict(cfg), 'run_dir': str(run_dir),
          'workers': int(workers), 'resume': bool(resume),
          'block': None if block is None else int(block),
          'worker_tile': worker_tile, 'deadline_s': float(deadline_s),
          'startup_timeout_s': float(startup_timeout_s), 'env': env or {},
          'coordinator_kwargs': coordinator_kwargs or {},
          'worker_kwargs': worker_kwargs or {},
          'log_dir': str(run_dir / run_dir_lib.LAUNCHPAD_LOGS),
          'processes_file': str(run_dir / run_dir_lib.LAUNCHPAD_PROCESSES),
          'network': 'exposed' if expose_courier_ports else 'host'}
  return launchpad_local.LocalProgram(spec, run_dir, python=python, prefix=prefix)


def wait_for_result(program: launchpad_local.LocalProgram, run_dir: str,
                    timeout_s: Optional[float] = None, poll_s: float = 0.2) -> dict:
  """Waits for coordinator_result.json (or the launcher's end); returns that result dict.

  Raises:
    CoordinatorFailed: the program ended without a result (the coordinator was killed).
    TimeoutError: no result within `timeout_s`.
  """
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    result = coordinator.read_result(run_dir)
    if result is not None:
      return result
    if not program.running():
      result = coordinator.read_result(run_dir)   # written just before the coordinator ended
      if result is not None:
        return result
      raise CoordinatorFailed(
          f'The coordinator ended without a result (killed?). The checkpoint in {run_dir} is '
          f'kept: continue with --resume.\n{program.log_tail()}')
    if deadline is not None and time.monotonic() > deadline:
      raise TimeoutError(f'The Launchpad run did not finish within {timeout_s:g} s.')
    time.sleep(poll_s)


def run_local_mp(cfg, run_dir: str, workers: int, resume: bool = False,
                 timeout_s: Optional[float] = None, block: Optional[int] = 64,
                 worker_tile: Optional[int] = None, deadline_s: float = 600.0,
                 startup_timeout_s: float = 300.0, env: Optional[dict] = None,
                 coordinator_kwargs: Optional[dict] = None,
                 expose_courier_ports: bool = False,
                 worker_kwargs: Optional[dict] = None) -> dict:
  """Runs `ntkdd distill --launch launchpad --workers N`: local_mp, waits, ends every process.

  Args:
    As `start_local_mp`; timeout_s: how long to wait for the result (None: no limit).

  Returns:
    The summary dict (as `distill.distill`).

  Raises:
    distill.Interrupted: the run was stopped by a signal (Ctrl-C here SIGTERMs the
      coordinator, which checkpoints first).
    CoordinatorFailed: the coordinator's error (and the node logs' tails).
    TimeoutError: past `timeout_s` (the checkpoint stays for --resume).
  """
  from ntkdd.server import distill
  program = start_local_mp(cfg, run_dir, workers, resume=resume, block=block,
                           worker_tile=worker_tile, deadline_s=deadline_s,
                           startup_timeout_s=startup_timeout_s, env=env,
                           coordinator_kwargs=coordinator_kwargs,
                           expose_courier_ports=expose_courier_ports,
                           worker_kwargs=worker_kwargs)
  try:
    try:
      result = wait_for_result(program, run_dir, timeout_s)
    except KeyboardInterrupt:
      program.stop()   # SIGTERM: the coordinator checkpoints at the end of its step
      raise distill.Interrupted(f'Stopped by Ctrl-C; checkpoint saved in {run_dir}. Continue '
                                f'with the same command plus --resume.') from None
  finally:
    program.stop()
  return coordinator.summary_of(result)


# -- Kernel workers for a caller that coordinates itself (`ntkdd kernel`). ----------------------

class LaunchpadKernels(distributed_kernels.OwnedWorkersKernels):
  """`DistributedKernels` over Launchpad kernel workers (local_mp); close() ends the program.

  Args:
    arch, tile, dtype, dataset: the workers' architecture, kernel tile, dtype and `DataSpec`
      dict (as `add_worker_nodes`).
    workers: how many workers; block: rows and columns of a kernel block (None: fitted to
      each call's rows).
    startup_timeout_s: how long the program and its workers may take to come up.
    log_dir: where the program's files go (default: a new temporary folder).
    env: extra environment variables of the worker nodes.
    expose_courier_ports: see `network_prefix`; this process must otherwise already run in
      a private network namespace.
    worker_kwargs: further `KernelWorker` arguments (JSON values; e.g. pin_core=True).
    **coordinator_kwargs: further `DistributedKernels` options.
  """

  def __init__(self, arch, workers: int, tile: Optional[int] = None, dtype: str = 'float32',
               block: Optional[int] = 64, startup_timeout_s: float = 300.0,
               log_dir: Optional[str] = None, env: Optional[dict] = None,
               dataset: Optional[dict] = None, expose_courier_ports: bool = False,
               worker_kwargs: Optional[dict] = None, **coordinator_kwargs):
    import_launchpad()
    if workers < 1:
      raise ValueError(f'--workers must be >= 1 with --launch launchpad, got {workers}.')
    # This process calls the workers, so the program shares its network: a private one
    # (checked here) or, opted in, the host's.
    network_prefix(expose_courier_ports, caller_coordinates=True)
    base = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix='ntkdd-launchpad-'))
    spec = {'kind': 'workers', 'arch': nodes.arch_dict(arch), 'workers': int(workers),
            'dtype': dtype, 'tile': tile, 'env': env or {}, 'dataset': dataset,
            'worker_kwargs': worker_kwargs or {},
            'log_dir': str(base / run_dir_lib.LAUNCHPAD_LOGS),
            'processes_file': str(base / run_dir_lib.LAUNCHPAD_PROCESSES),
            'network': 'exposed' if expose_courier_ports else 'inherited'}
    self.program = launchpad_local.LocalProgram(spec, base)
    self._backend = None
    try:
      info = self.program.processes(startup_timeout_s)
      handles = [CourierWorkerHandle(a) for a in info['addresses'][WORKERS]]
      coordinator.wait_for_workers(handles, startup_timeout_s)
      self._backend = distributed_kernels.DistributedKernels(handles, block=block, dtype=dtype,
                                                             **coordinator_kwargs)
    except BaseException:
      self.program.stop()
      raise

  def _release(self) -> None:
    self.program.stop()


def make_launchpad_backend(arch, workers: int, tile: Optional[int] = None,
                           dtype: str = 'float32', block: Optional[int] = 64,
                           **kwargs) -> LaunchpadKernels:
  """The backend factory of `--launch launchpad` where this process coordinates."""
  return LaunchpadKernels(arch, workers, tile=tile, dtype=dtype, block=block, **kwargs)


def kernel_local_mp(arch, x1, x2=None, workers: int = 1, tile: Optional[int] = None,
                    dtype: str = 'float32', block: Optional[int] = 64, **kwargs) -> dict:
  """`ntkdd kernel --launch launchpad`: {'ntk', 'nngp'} of x1 (and x2) on Launchpad workers."""
  with make_launchpad_backend(arch, workers, tile=tile, dtype=dtype, block=block,
                              **kwargs) as backend:
    return backend.kernel(x1, x2)
