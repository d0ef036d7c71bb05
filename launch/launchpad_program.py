"""The Launchpad launch type: kernel workers and the coordinator as Courier nodes (local_mp).

`make_program` builds the Launchpad program: one `lp.CourierNode(KernelWorker, ...)` per worker
in the 'workers' group and one `lp.CourierNode(CoordinatorNode, ...)` in the 'coordinator'
group, which gets the workers' Courier handles, runs `jobs.run` (KIP/LS: `distill.distill`;
RCIG: `rcig_loop.run_rcig`, the workers serving its KRR evaluation) over a
`DistributedKernels` of them and serves `status()` (JSON bytes) while it runs.

`run_local_mp` runs such a program on this machine (Launchpad's LOCAL_MULTI_PROCESSING launch
type) and returns the run's summary. What it does, and why (Launchpad 0.5.2 on this stack):

* The launch happens in a separate launcher process (its own session, so its own process
  group), never in the caller. Launchpad's `WorkerManager` takes over SIGTERM/SIGINT/SIGQUIT/
  SIGALRM in the launching process, stops the whole program when any node exits non-zero (a
  killed kernel worker would end the run the coordinator is meant to survive), and after
  `--lp_termination_notice_secs` SIGKILLs its own process tree, the launcher included. In a
  launcher process of its own none of that touches the caller; the caller ends everything by
  signalling the launcher's process group (SIGTERM, then SIGKILL), by pid.
* `terminal='output_to_files'` needs no terminal, tmux or X (the default picks gnome-terminal,
  tmux or xterm when it finds one). Each node's output goes to `run_dir/launchpad_logs/<group>/
  <index>`; that launcher reads its folder from the module global `_LOGGING_DIR` (set from
  $LAUNCHPAD_LOGGING_DIR at import), which the launcher sets before launching.
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
* Worker handles are Courier clients. The coordinator first pings each with `wait_for_ready`
  (so it waits for workers still importing JAX/TensorFlow), then calls them through clients with
  `wait_for_ready=False`, so a dead worker fails its call at once instead of waiting for it
  to come back; `DistributedKernels` re-queues its blocks and pings it later.
* Only bytes/ints/strs cross Courier (a numpy argument hangs on this stack).

Files in the run directory besides distill's: coordinator_address.txt (HOST:PORT of status(),
reachable only inside the run's namespace), status.sock and status.json (status from the host),
coordinator_result.json (ok / error / interrupted, written when the coordinator ends),
launchpad_processes.json (pids, the namespace), launchpad_logs/ (each node's output,
launcher.log).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from ntkdd.launch import private_network
from ntkdd.server import distributed_kernels
from ntkdd.server import status as status_lib

ADDRESS_FILE = status_lib.ADDRESS_FILE
RESULT_FILE = status_lib.RESULT_FILE
PROCESSES_FILE = 'launchpad_processes.json'
WORKER_PIDS_FILE = 'worker_pids.json'
LOG_DIR = 'launchpad_logs'
SPEC_FILE = 'launchpad_spec.json'
COORDINATOR, WORKERS = 'coordinator', 'workers'

INSTALL_HINT = ("the Launchpad launch type needs dm-launchpad 0.5.2 (with Courier) on Python "
                "3.10: pip install 'ntkdd[launchpad]' -c constraints/launchpad.txt "
                "(make venv-lp builds that environment as .venv-lp).")


EXPOSE_FLAG = '--expose-courier-ports'
NETNS_FILE = 'netns'   # in the log folder: the namespace the launcher entered


class CoordinatorFailed(RuntimeError):
  """The Launchpad coordinator ended without finishing the run; the message says why."""


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

  Returns `unshare -n` (or `-rn`) when this process is on the host's network; [] when it
  already runs in a private namespace of ntkdd's (a CLI that re-ran itself there, a test) or
  when `expose_courier_ports` opts out (logged as a warning). `caller_coordinates`: this
  process talks to the workers itself (`ntkdd kernel`), so it must already be inside.
  Raises `PrivateNetworkUnavailable` (why, and how to proceed) otherwise.
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


def _write_text(path: Path, text: str) -> None:
  from ntkdd.server import checkpoint
  checkpoint.atomic_write_bytes(Path(path), text.encode())


def _write_json(path: Path, obj: Any) -> None:
  from ntkdd.server import checkpoint
  checkpoint.write_json(Path(path), obj)


def _rpc_clients(handles: Sequence, startup_timeout_s: float) -> tuple[list, dict]:
  """Waits until every worker answers ping; returns (handles to use, {index: ping answer})."""
  from ntkdd.common import wire
  try:
    import courier  # pylint: disable=import-outside-toplevel
  except ImportError:
    courier = None
  clients, answers = [], {}
  deadline = time.monotonic() + startup_timeout_s
  for i, handle in enumerate(handles):
    address = getattr(handle, 'address', None)
    if courier is None or not isinstance(address, str):
      clients.append(handle)   # not a Courier client (tests pass local handles): use it as is
      answers[i] = wire.decode(handle.ping())
      continue
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        raise CoordinatorFailed(f'Kernel worker {i} at {address} did not answer ping within '
                                f'{startup_timeout_s:g} s of the coordinator starting.')
      probe = courier.Client(address, call_timeout=min(left, 30.0), wait_for_ready=True)
      try:
        answers[i] = wire.decode(probe.ping())
        break
      except Exception as e:  # not up yet: wait_for_ready waited up to 30 s; try again
        logging.info('Kernel worker %d at %s not ready yet: %s', i, address, e)
        time.sleep(0.5)
    clients.append(courier.Client(address, wait_for_ready=False))
  return clients, answers


class CoordinatorNode:
  """The Launchpad coordinator: runs the distillation over worker handles; serves status().

  Args:
    config: the run as `jobs.to_dict(cfg)` (a KIP/LS `DistillConfig` or an RCIG `RcigJob`).
    run_dir: the run directory (shared with the launching process).
    resume: continue the run from its checkpoint.npz.
    worker_handles: one handle per kernel worker (Courier clients under Launchpad).
    block, deadline_s, coordinator_kwargs: for `DistributedKernels`.
    startup_timeout_s: how long to wait for all workers to answer their first ping.
    stop_program: call `lp.stop()` at the end, so a plain `lp.launch(...)` of the program ends.
  """

  def __init__(self, config: dict, run_dir: str, resume: bool, worker_handles: Sequence,
               block: int = 64, deadline_s: float = 600.0, startup_timeout_s: float = 300.0,
               stop_program: bool = True, coordinator_kwargs: Optional[dict] = None):
    self._config = dict(config)
    self._run_dir = Path(run_dir)
    self._resume = bool(resume)
    self._handles = list(worker_handles)
    self._block, self._deadline_s = int(block), float(deadline_s)
    self._startup_timeout_s = float(startup_timeout_s)
    self._stop_program = stop_program
    self._coordinator_kwargs = dict(coordinator_kwargs or {})
    self._server = None
    self._started = threading.Event()
    self._status = status_lib.RunStatus(str(self._run_dir),
                                        total_steps=status_lib.total_steps(config))
    self._status.set_extra(coordinator_pid=os.getpid(), workers_expected=len(self._handles))

  # -- Courier: Launchpad hands over the server; we start it before run() so status() answers
  # while the workers start up. -------------------------------------------------------------

  def set_courier_server(self, server) -> None:
    self._server = server
    server.Start()
    address = f'localhost:{server.port}'
    self._status.set_extra(address=address)
    self._run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(self._run_dir / ADDRESS_FILE, address + '\n')
    logging.info('Coordinator status RPC at %s.', address)

  # -- RPC methods (bytes out). -----------------------------------------------------------------

  def ping(self) -> bytes:
    return json.dumps({'ok': True, 'pid': os.getpid(), 'role': COORDINATOR}).encode()

  def status(self) -> bytes:
    """The run's status snapshot as JSON bytes (see server/status.py)."""
    return self._status.to_bytes()

  # -- The run. -------------------------------------------------------------------------------

  def run(self) -> None:
    if self._started.is_set():
      raise RuntimeError('CoordinatorNode.run() runs once per coordinator.')
    self._started.set()
    from ntkdd.server import distill, jobs
    result: dict = {'ok': False, 'pid': os.getpid()}
    # Status for this machine without the network (the Courier port may live in a private
    # namespace): status.sock and status.json in the run directory.
    self._run_dir.mkdir(parents=True, exist_ok=True)
    publisher = status_lib.StatusPublisher(self._status, str(self._run_dir)).start()
    ended_by: Optional[BaseException] = None
    try:
      (self._run_dir / RESULT_FILE).unlink(missing_ok=True)   # a stale one of a killed run
      if self._server is None:   # not under Launchpad: no status RPC, still a run
        logging.info('Coordinator running without a Courier server.')
      cfg = jobs.from_dict(self._config)
      clients, answers = _rpc_clients(self._handles, self._startup_timeout_s)
      pids = {str(i): a.get('pid') for i, a in answers.items()}
      _write_json(self._run_dir / WORKER_PIDS_FILE, {'coordinator': os.getpid(), 'workers': pids})
      self._status.set_extra(worker_pids=pids)
      self._status.set_phase('running')

      backends = []

      def factory(arch):
        kwargs = dict(self._coordinator_kwargs)
        backend = distributed_kernels.DistributedKernels(
            clients, block=self._block, deadline_s=self._deadline_s, dtype=cfg.dtype, **kwargs)
        self._status.attach_backend(backend)
        backends.append(backend)
        return backend

      # KIP/LS or RCIG: the loops of the in-process path (server/jobs.py).
      summary = jobs.run(cfg, str(self._run_dir), factory, resume=self._resume,
                         progress=False, run_status=self._status)
      # The backend's totals (blocks, bytes, index blocks, faults) for the record.
      result.update(ok=True, summary=summary, backend=backends[-1].status() if backends else None)
      self._status.set_phase('done')
    except distill.Interrupted as e:
      ended_by = e
      result.update(interrupted=True, error=str(e))
      self._status.set_phase('interrupted', str(e))
    except BaseException as e:  # reported through the run directory, then the node ends
      ended_by = e
      result.update(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
      self._status.set_phase('failed', result['error'])
      logging.exception('Coordinator failed.')
    finally:
      try:
        _write_json(self._run_dir / RESULT_FILE, result)
        publisher.finish(ended_by)
      finally:
        if self._server is not None:
          self._server.Stop()
        if self._stop_program:
          _stop_launchpad_program()


def _stop_launchpad_program() -> None:
  try:
    import launchpad as lp  # pylint: disable=import-outside-toplevel
    lp.stop()
  except Exception as e:  # not launched by Launchpad (a test), or the launcher is gone
    logging.info('lp.stop() skipped: %s', e)


def rerun_in_private_network(argv: Sequence[str]) -> Optional[int]:
  """For a process that coordinates Launchpad workers itself (`ntkdd kernel`, a benchmark):
  runs the command `argv` (this process's own, typically) inside a private network namespace
  and returns its exit code; None when this process already runs in one and may go on.
  Raises `PrivateNetworkUnavailable` where no namespace can be made."""
  prefix = network_prefix()
  if not prefix:
    return None
  done = private_network.run(list(argv), prefix, timeout_s=None, capture=False,
                             new_session=False)
  return done.returncode if isinstance(done.returncode, int) else 1


# -- The program. -------------------------------------------------------------------------------

def _arch_dict(arch) -> dict:
  return arch.to_dict() if hasattr(arch, 'to_dict') else dict(arch)


def add_worker_nodes(program, arch, workers: int, dtype: str = 'float32',
                     tile: Optional[int] = None, dataset: Optional[dict] = None) -> list:
  """`workers` KernelWorker Courier nodes in the program's 'workers' group; their handles.

  `dataset` (a `DataSpec` dict): each worker loads it itself, so targets go as indices.
  """
  lp = import_launchpad()
  from ntkdd.workers import kernel_worker
  if workers < 1:
    raise ValueError(f'--workers must be >= 1 with --launch launchpad, got {workers}.')
  handles = []
  with program.group(WORKERS):
    for i in range(workers):
      node = lp.CourierNode(kernel_worker.KernelWorker, _arch_dict(arch), dtype, tile,
                            worker_id=i, dataset=dataset)
      handles.append(program.add_node(node))
  return handles


def make_program(cfg, run_dir: str, workers: int, resume: bool = False, block: int = 64,
                 worker_tile: Optional[int] = None, deadline_s: float = 600.0,
                 startup_timeout_s: float = 300.0, stop_program: bool = True,
                 coordinator_kwargs: Optional[dict] = None):
  """The Launchpad program of a distillation: kernel workers plus the coordinator.

  `cfg`: a `DistillConfig` (KIP, LS) or a `jobs.RcigJob` (the workers serve its KRR
  evaluation's kernel)."""
  lp = import_launchpad()
  from ntkdd.server import jobs
  cfg.validate()
  program = lp.Program('ntkdd-distill')
  tile = worker_tile if worker_tile is not None else cfg.tile
  handles = add_worker_nodes(program, cfg.architecture(), workers, cfg.dtype, tile,
                             dataset=cfg.data_spec().to_dict())
  with program.group(COORDINATOR):
    program.add_node(lp.CourierNode(
        CoordinatorNode, jobs.to_dict(cfg), str(run_dir), bool(resume), handles,
        block=block, deadline_s=deadline_s, startup_timeout_s=startup_timeout_s,
        stop_program=stop_program, coordinator_kwargs=coordinator_kwargs))
  return program


def make_worker_program(arch, workers: int, dtype: str = 'float32', tile: Optional[int] = None,
                        dataset: Optional[dict] = None):
  """A program of kernel workers only (the caller coordinates): `ntkdd kernel`."""
  lp = import_launchpad()
  program = lp.Program('ntkdd-workers')
  add_worker_nodes(program, arch, workers, dtype, tile, dataset=dataset)
  return program


def _node_env(extra: Optional[dict] = None) -> dict:
  env = {'TF_CPP_MIN_LOG_LEVEL': '2',
         # Several workers on one GPU must not each grab 75% of its memory.
         'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  env.update({k: str(v) for k, v in (extra or {}).items()})
  return env


# -- The launcher process. ----------------------------------------------------------------------

def _launcher_main(spec_path: str) -> None:
  """Runs in the launcher process: launch (local_mp), watch, then end every node."""
  spec = json.loads(Path(spec_path).read_text())
  logging.basicConfig(level=logging.INFO, format='%(asctime)s launcher %(message)s')
  lp = import_launchpad()
  from launchpad.launch.run_locally import launch_local_output_to_files
  from launchpad.nodes.python import local_multi_processing
  launch_local_output_to_files._LOGGING_DIR = spec['log_dir']  # pylint: disable=protected-access
  from ntkdd.common import architectures
  from ntkdd.server import jobs
  if spec['kind'] == 'distill':
    cfg = jobs.from_dict(spec['config'])
    program = make_program(cfg, spec['run_dir'], spec['workers'], resume=spec['resume'],
                           block=spec['block'], worker_tile=spec['worker_tile'],
                           deadline_s=spec['deadline_s'],
                           startup_timeout_s=spec['startup_timeout_s'],
                           coordinator_kwargs=spec.get('coordinator_kwargs'))
  else:
    program = make_worker_program(architectures.Architecture.from_dict(spec['arch']),
                                  spec['workers'], spec['dtype'], spec['tile'],
                                  dataset=spec.get('dataset'))
  env = _node_env(spec.get('env'))
  resources = {label: local_multi_processing.PythonProcess(env=env) for label in program.groups}
  manager = lp.launch(program, launch_type=lp.LaunchType.LOCAL_MULTI_PROCESSING,
                      terminal='output_to_files', local_resources=resources)
  # Launchpad's handlers (installed by lp.launch) would stop the program when any node exits
  # non-zero and finally SIGKILL this process tree; this launcher decides instead.
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(sig, lambda *_: stop.set())
  signal.signal(signal.SIGALRM, signal.SIG_IGN)
  signal.alarm(0)
  # The manager names each process '<group>/<index>'; gather them by group, in index order.
  titled = sorted(manager._active_workers.items(),  # pylint: disable=protected-access
                  key=lambda kv: (kv[0].split('/')[0], int(kv[0].rsplit('/', 1)[-1])
                                  if kv[0].rsplit('/', 1)[-1].isdigit() else 0))
  nodes: dict = {}
  for title, procs in titled:
    nodes.setdefault(title.split('/')[0], []).extend(procs)
  info = {'launcher': os.getpid(), 'netns': os.readlink('/proc/self/ns/net'),
          'network': spec.get('network', 'host'),
          'nodes': {label: [p.pid for p in procs] for label, procs in nodes.items()},
          'addresses': {label: [n.courier_address.resolve() for n in program.groups[label]]
                        for label in program.groups}}
  _write_json(Path(spec['processes_file']), info)
  watched = nodes.get(COORDINATOR) or []
  while not stop.is_set():
    if watched and all(p.poll() is not None for p in watched):
      break
    stop.wait(0.2)
  code = 0
  # The coordinator first (it checkpoints on SIGTERM and needs its workers for the step it is
  # in), then the workers; whatever outlives the grace period is killed.
  deadline = time.monotonic() + float(spec.get('stop_grace_s', 60))
  for group in [watched, [p for label, procs in nodes.items() if label != COORDINATOR
                          for p in procs]]:
    for p in group:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    while time.monotonic() < deadline and any(p.poll() is None for p in group):
      time.sleep(0.1)
  for p in (p for procs in nodes.values() for p in procs):
    if p.poll() is None:
      p.kill()
      p.wait()
  if watched:
    code = watched[0].returncode or 0
  logging.info('Launcher done; coordinator exit code %s.', code)
  sys.stdout.flush()
  os._exit(0 if code == 0 else 1)   # skips Launchpad's atexit manager.wait()


class LocalProgram:
  """A Launchpad program running under a launcher process started by this one.

  Use as a context manager: leaving it ends the launcher's process group (every node).
  """

  def __init__(self, spec: dict, base_dir: Path, python: Optional[str] = None,
               prefix: Sequence[str] = ()):
    self.base_dir = Path(base_dir)
    self.log_dir = Path(spec['log_dir'])
    self.log_dir.mkdir(parents=True, exist_ok=True)
    self.processes_file = Path(spec['processes_file'])
    self.processes_file.unlink(missing_ok=True)
    spec = dict(spec, network='private' if prefix else spec.get('network', 'host'))
    spec_path = self.base_dir / SPEC_FILE
    _write_json(spec_path, spec)
    self._log = open(self.log_dir / 'launcher.log', 'ab')
    code = ('import sys; from ntkdd.launch import launchpad_program as m; '
            'm._launcher_main(sys.argv[1])')
    argv = [python or sys.executable, '-c', code, str(spec_path)]
    env = None
    netns_file = self.log_dir / NETNS_FILE
    netns_file.unlink(missing_ok=True)
    if prefix:   # `unshare -n` execs (no fork), so the pid stays the launcher's
      argv = list(prefix) + ['bash', '-c', private_network.ENTER, 'enter'] + argv
      env = dict(os.environ, NTKDD_NETNS_FILE=str(netns_file))
    self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
    self.pid = self.process.pid    # also the process group id of every node
    self._namespace = None
    if prefix:
      self._namespace = private_network.NamespaceGuard(netns_file, self.pid)
      if not self._namespace.acquire(timeout_s=30):
        self.stop()
        raise CoordinatorFailed(f'The Launchpad launcher did not enter its private network '
                                f'namespace.\n{self.log_tail()}')

  def processes(self, timeout_s: float = 120.0) -> dict:
    """{'launcher': pid, 'nodes': {group: [pids]}, 'addresses': {group: [HOST:PORT]}}."""
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        return json.loads(self.processes_file.read_text())
      except (OSError, ValueError):
        pass
      if self.process.poll() is not None:
        raise CoordinatorFailed(f'The Launchpad launcher exited (code {self.process.returncode})'
                                f' before starting the nodes.\n{self.log_tail()}')
      if time.monotonic() > deadline:
        raise TimeoutError(f'The Launchpad program did not start within {timeout_s:g} s.\n'
                           f'{self.log_tail()}')
      time.sleep(0.1)

  def running(self) -> bool:
    return self.process.poll() is None

  def log_tail(self, lines: int = 30) -> str:
    """The last lines of the launcher's and each node's log."""
    parts = []
    for path in sorted(p for p in self.log_dir.rglob('*') if p.is_file()):
      try:
        text = path.read_text(errors='replace').splitlines()[-lines:]
      except OSError:
        continue
      parts.append(f'--- {path.relative_to(self.log_dir)} ---\n' + '\n'.join(text))
    return '\n'.join(parts)

  def stop(self, grace_s: float = 60.0) -> None:
    """Asks the launcher to end the program; then SIGKILLs its whole process group."""
    try:
      if self.process.poll() is None:
        os.kill(self.pid, signal.SIGTERM)
        try:
          self.process.wait(timeout=grace_s + 5)
        except subprocess.TimeoutExpired:
          pass
    finally:
      try:
        os.killpg(self.pid, signal.SIGKILL)   # anything left in the group, by its id
      except (ProcessLookupError, PermissionError):
        pass
      if self.process.poll() is None:
        self.process.kill()
      self.process.wait()
      if self._namespace is not None:   # anything left in the run's namespace, by pid
        self._namespace.kill_all()
      self._log.close()

  def __enter__(self) -> 'LocalProgram':
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def open_run_dir(run_dir, resume: bool, stale_files: Sequence[str]) -> Path:
  """The run directory, made if need be; refuses an existing run without --resume and removes
  the files a previous coordinator left (`stale_files`), so none is mistaken for this run's."""
  from ntkdd.server import checkpoint
  run_dir = Path(run_dir).resolve()
  checkpoint.check_run_dir(run_dir, resume)
  run_dir.mkdir(parents=True, exist_ok=True)
  for name in stale_files:
    (run_dir / name).unlink(missing_ok=True)
  return run_dir


def start_local_mp(cfg, run_dir: str, workers: int, resume: bool = False, block: int = 64,
                   worker_tile: Optional[int] = None, deadline_s: float = 600.0,
                   startup_timeout_s: float = 300.0, env: Optional[dict] = None,
                   coordinator_kwargs: Optional[dict] = None,
                   python: Optional[str] = None,
                   expose_courier_ports: bool = False) -> LocalProgram:
  """Starts the distillation program (local_mp) in a launcher process; does not wait.

  The launcher and every node run in a private network namespace (see `network_prefix`);
  `expose_courier_ports` lets their Courier ports listen on the host's network instead.
  """
  import_launchpad()   # fail here, clearly, rather than in the launcher process
  from ntkdd.server import jobs
  cfg.validate()
  if workers < 1:
    raise ValueError(f'--workers must be >= 1 with --launch launchpad, got {workers}.')
  prefix = network_prefix(expose_courier_ports)
  run_dir = open_run_dir(run_dir, resume, (RESULT_FILE, ADDRESS_FILE, WORKER_PIDS_FILE))
  spec = {'kind': 'distill', 'config': jobs.to_dict(cfg), 'run_dir': str(run_dir),
          'workers': int(workers), 'resume': bool(resume), 'block': int(block),
          'worker_tile': worker_tile, 'deadline_s': float(deadline_s),
          'startup_timeout_s': float(startup_timeout_s), 'env': env or {},
          'coordinator_kwargs': coordinator_kwargs or {},
          'log_dir': str(run_dir / LOG_DIR), 'processes_file': str(run_dir / PROCESSES_FILE),
          'network': 'exposed' if expose_courier_ports else 'host'}
  return LocalProgram(spec, run_dir, python=python, prefix=prefix)


def wait_for_result(program: LocalProgram, run_dir: str, timeout_s: Optional[float] = None,
                    poll_s: float = 0.2) -> dict:
  """Waits for coordinator_result.json (or the launcher's end); returns that result dict."""
  path = Path(run_dir) / RESULT_FILE
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    if path.exists():
      try:
        return json.loads(path.read_text())
      except ValueError:
        pass   # written atomically, so only an odd file system gets here; read again
    if not program.running():
      if path.exists():
        continue
      raise CoordinatorFailed(
          f'The coordinator ended without a result (killed?). The checkpoint in {run_dir} is '
          f'kept: continue with --resume.\n{program.log_tail()}')
    if deadline is not None and time.monotonic() > deadline:
      raise TimeoutError(f'The Launchpad run did not finish within {timeout_s:g} s.')
    time.sleep(poll_s)


def run_local_mp(cfg, run_dir: str, workers: int, resume: bool = False,
                 timeout_s: Optional[float] = None, block: int = 64,
                 worker_tile: Optional[int] = None, deadline_s: float = 600.0,
                 startup_timeout_s: float = 300.0, env: Optional[dict] = None,
                 coordinator_kwargs: Optional[dict] = None,
                 expose_courier_ports: bool = False) -> dict:
  """Runs `ntkdd distill --launch launchpad --workers N`: local_mp, waits, ends every process.

  Returns the summary dict (as `distill.distill`). Raises `distill.Interrupted` if the run was
  stopped by a signal (Ctrl-C here SIGTERMs the coordinator, which checkpoints first),
  `CoordinatorFailed` with the coordinator's error (and the node logs' tails) otherwise, and
  `TimeoutError` past `timeout_s` (the checkpoint stays for --resume).
  """
  from ntkdd.server import distill
  program = start_local_mp(cfg, run_dir, workers, resume=resume, block=block,
                           worker_tile=worker_tile, deadline_s=deadline_s,
                           startup_timeout_s=startup_timeout_s, env=env,
                           coordinator_kwargs=coordinator_kwargs,
                           expose_courier_ports=expose_courier_ports)
  try:
    try:
      result = wait_for_result(program, run_dir, timeout_s)
    except KeyboardInterrupt:
      program.stop()   # SIGTERM: the coordinator checkpoints at the end of its step
      raise distill.Interrupted(f'Stopped by Ctrl-C; checkpoint saved in {run_dir}. Continue '
                                f'with the same command plus --resume.') from None
  finally:
    program.stop()
  return summary_of(result)


def summary_of(result: dict, failed=CoordinatorFailed) -> dict:
  """The summary in a coordinator's result; `Interrupted` or `failed` with its error."""
  from ntkdd.server import distill
  if result.get('ok'):
    return result['summary']
  if result.get('interrupted'):
    raise distill.Interrupted(result.get('error') or 'Interrupted.')
  raise failed(f"The coordinator failed: {result.get('error')}\n"
               f"{result.get('traceback') or ''}")


# -- Kernel workers for a caller that coordinates itself (`ntkdd kernel`). ----------------------

class LaunchpadKernels(distributed_kernels.OwnedWorkersKernels):
  """`DistributedKernels` over Launchpad kernel workers (local_mp); close() ends the program."""

  def __init__(self, arch, workers: int, tile: Optional[int] = None, dtype: str = 'float32',
               block: int = 64, startup_timeout_s: float = 300.0,
               log_dir: Optional[str] = None, env: Optional[dict] = None,
               dataset: Optional[dict] = None, expose_courier_ports: bool = False,
               **coordinator_kwargs):
    import_launchpad()
    from ntkdd.server import distributed_kernels
    if workers < 1:
      raise ValueError(f'--workers must be >= 1 with --launch launchpad, got {workers}.')
    # This process calls the workers, so the program shares its network: a private one
    # (checked here) or, opted in, the host's.
    network_prefix(expose_courier_ports, caller_coordinates=True)
    base = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix='ntkdd-launchpad-'))
    spec = {'kind': 'workers', 'arch': _arch_dict(arch), 'workers': int(workers),
            'dtype': dtype, 'tile': tile, 'env': env or {}, 'dataset': dataset,
            'log_dir': str(base / LOG_DIR),
            'processes_file': str(base / PROCESSES_FILE),
            'network': 'exposed' if expose_courier_ports else 'inherited'}
    self.program = LocalProgram(spec, base)
    self._backend = None
    try:
      info = self.program.processes(startup_timeout_s)
      handles = [_LazyClient(a) for a in info['addresses'][WORKERS]]
      clients, _ = _rpc_clients(handles, startup_timeout_s)
      self._backend = distributed_kernels.DistributedKernels(clients, block=block, dtype=dtype,
                                                             **coordinator_kwargs)
    except BaseException:
      self.program.stop()
      raise

  def _release(self) -> None:
    self.program.stop()


class _LazyClient:
  """Only an address: `_rpc_clients` makes the Courier clients."""

  def __init__(self, address: str):
    self.address = address


def make_launchpad_backend(arch, workers: int, tile: Optional[int] = None,
                           dtype: str = 'float32', block: int = 64,
                           **kwargs) -> LaunchpadKernels:
  """The backend factory of `--launch launchpad` where this process coordinates."""
  return LaunchpadKernels(arch, workers, tile=tile, dtype=dtype, block=block, **kwargs)


def kernel_local_mp(arch, x1, x2=None, workers: int = 1, tile: Optional[int] = None,
                    dtype: str = 'float32', block: int = 64, **kwargs) -> dict:
  """`ntkdd kernel --launch launchpad`: {'ntk', 'nngp'} of x1 (and x2) on Launchpad workers."""
  with make_launchpad_backend(arch, workers, tile=tile, dtype=dtype, block=block,
                              **kwargs) as backend:
    return backend.kernel(x1, x2)
