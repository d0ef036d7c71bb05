"""A run's status: its snapshot (progress, accuracy, workers, checkpoint) and its publication.

A snapshot is a JSON-able dict. It is built from the run directory (config.json, metrics.jsonl,
checkpoint.npz, summary.json, coordinator_result.json), which the distill loop already writes
atomically, plus the live kernel backend's `status()` (per-worker health) where one is given.
`RunStatus` is the thread-safe holder a coordinator keeps: its phase, error and any fields set
directly, merged over the run directory's view. `StatusPublisher` gives it to the host without
any network: it serves the snapshot on the Unix socket RUN_DIR/status.sock (mode 0600, so the
file system's permissions are the authentication) and keeps RUN_DIR/status.json, replaced
atomically every few seconds and once more, final, when the run ends. A launcher may also
serve `RunStatus.to_bytes()` as an RPC (JSON bytes, never numpy: Courier hangs on array
arguments and bytes are the safe answer type). Asking for a status, and printing it, is
launch/status_client.py's; `progress.KernelProgress` reports long kernel computations into it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ntkdd.server import run_dir as run_files
from ntkdd.server.checkpoint import checkpoint_step
from ntkdd.server.progress import KERNEL_PROGRESS_HOLDER, finite_or_none

PHASES = ('starting', 'running', 'done', 'failed', 'interrupted')
ENDED_PHASES = ('done', 'failed', 'interrupted', 'crashed')   # 'crashed' is only ever inferred
SNAPSHOT_EVERY_S = 5.0


class StatusQueryError(RuntimeError):
  """No status could be had from a coordinator address."""


def total_steps(flags: dict) -> Optional[int]:
  """The steps a run's flags ask for; None for Label Solve, which has no steps (its time goes
  to kernel computations, shown as `kernel_progress`)."""
  return None if flags.get('algorithm') == 'ls' else flags.get('steps')


def status_from_run_dir(run_dir: str, backend: Any = None, now: Optional[float] = None) -> dict:
  """A status snapshot of the run in `run_dir`, as its files tell it.

  Args:
    run_dir: the run directory (a missing one, or one without files yet, is phase 'starting').
    backend: a kernel backend whose `status()` adds the workers' health and the throughput.
    now: the time the snapshot is for (ages and elapsed time are measured to it).

  Returns:
    A JSON-able dict: step, loss, accuracies (last, best, initial), pairs/s, elapsed, ETA,
    checkpoint step and age, phase ('starting', 'running', 'done', 'failed', 'interrupted')
    and error, workers.
  """
  run_dir = Path(run_dir)
  now = time.time() if now is None else now
  config = run_files.read_json(run_dir / run_files.CONFIG) or {}
  flags = config.get('flags', {})
  records = run_files.read_metrics(run_dir)
  summary = run_files.read_json(run_dir / run_files.SUMMARY)
  result = run_files.read_json(run_dir / run_files.COORDINATOR_RESULT)
  snap: dict[str, Any] = {
      'run_dir': str(run_dir), 'time': now, 'algorithm': flags.get('algorithm'),
      'dataset': (config.get('dataset') or {}).get('name') or flags.get('dataset'),
      'ipc': flags.get('ipc'), 'arch': flags.get('arch'),
      'total_steps': total_steps(flags),
      'step': 0, 'loss': None, 'last_accuracy': None, 'last_accuracy_step': None,
      'initial_accuracy': None, 'best_accuracy': None, 'best_accuracy_step': None,
      'pairs_per_second': None, 'elapsed_s': None, 'eta_s': None, 'seconds_per_step': None,
      'checkpoint': None, 'checkpoint_step': None, 'checkpoint_age_s': None,
      'phase': 'starting', 'error': None, 'workers': [], 'alive_workers': None}
  if config.get('created'):
    try:
      created = time.mktime(time.strptime(config['created'], '%Y-%m-%dT%H:%M:%S%z'))
      snap['started'] = config['created']
      snap['elapsed_s'] = max(0.0, now - created)
    except ValueError:
      pass
  for record in records:
    step = record.get('step')
    if not isinstance(step, int):
      continue
    snap['step'] = max(snap['step'], step)
    if record.get('loss') is not None:
      snap['loss'] = finite_or_none(record['loss'])
    if record.get('pairs_per_second') is not None:
      snap['pairs_per_second'] = finite_or_none(record['pairs_per_second'])
    # KIP/LS log KRR test accuracy; RCIG the finite ConvNet's test accuracy (and, with kernel
    # workers, the KRR test accuracy beside it: last_krr_accuracy).
    accuracy = finite_or_none(record.get('test_accuracy', record.get('krr_test_accuracy')))
    if 'test_accuracy' in record and finite_or_none(record.get('krr_test_accuracy')) is not None:
      snap['last_krr_accuracy'] = finite_or_none(record['krr_test_accuracy'])
    if accuracy is not None:
      if step == 0 and snap['initial_accuracy'] is None:
        snap['initial_accuracy'] = accuracy
      snap['last_accuracy'], snap['last_accuracy_step'] = accuracy, step
      if snap['best_accuracy'] is None or accuracy > snap['best_accuracy']:
        snap['best_accuracy'], snap['best_accuracy_step'] = accuracy, step
  # ETA from the step times of the (at most 20) latest steps; wall_time is cumulative step time.
  timed = [(r['step'], r['wall_time']) for r in records
           if isinstance(r.get('step'), int) and r['step'] > 0
           and finite_or_none(r.get('wall_time')) is not None]
  if timed:
    recent = timed[-20:]
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
      per_step = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    else:
      per_step = recent[-1][1] / max(recent[-1][0], 1)
    snap['seconds_per_step'] = per_step
    if isinstance(snap['total_steps'], int):
      snap['eta_s'] = max(0, snap['total_steps'] - snap['step']) * per_step
  ckpt = run_dir / run_files.CHECKPOINT
  try:
    snap['checkpoint_age_s'] = max(0.0, now - ckpt.stat().st_mtime)
    snap['checkpoint'] = str(ckpt)
    snap['checkpoint_step'] = checkpoint_step(ckpt)
  except OSError:
    pass
  if records or ckpt.exists():
    snap['phase'] = 'running'
  if summary is not None:
    snap['phase'], snap['eta_s'] = 'done', 0.0
    snap['summary'] = summary
    # The set's accuracy before distilling, where the summary records it: Label Solve logs one
    # metrics row, at step 0, and it is the solved set's accuracy, not the random real one's.
    before = summary.get('krr_test_accuracy_before', summary.get('test_accuracy_before'))
    if finite_or_none(before) is not None:
      snap['initial_accuracy'] = finite_or_none(before)
  if result is not None and not result.get('ok', False):
    snap['phase'] = 'interrupted' if result.get('interrupted') else 'failed'
    snap['error'] = result.get('error')
  if backend is not None:
    try:
      snap.update(_backend_fields(backend.status()))
    except Exception as e:  # a status query must never fail on the backend's account
      snap['backend_error'] = f'{type(e).__name__}: {e}'
  return snap


def _backend_fields(backend_status: dict) -> dict:
  workers = []
  for w in backend_status.get('workers', []):
    workers.append({k: w.get(k) for k in (
        'worker', 'alive', 'blocks_done', 'pairs_done', 'in_flight', 'failures',
        'seconds_since_seen', 'last_error', 'down_for_s', 'pid', 'device', 'core')})
  fields = {'workers': workers,
            'alive_workers': backend_status.get('alive_workers',
                                                sum(bool(w['alive']) for w in workers)),
            'backend': {k: v for k, v in backend_status.items() if k != 'workers'}}
  if backend_status.get('pairs_per_second'):
    fields['pairs_per_second'] = backend_status['pairs_per_second']
  return fields


class RunStatus:
  """Thread-safe status of one run: phase/error and explicit fields over the run directory's.

  The distill loop and coordinator threads call `update`, `set_phase` and `attach_backend`; the
  RPC thread calls `snapshot`. Fields set with `update` (step, loss, ...) override what the run
  directory says, which covers runs that do not write one.
  """

  def __init__(self, run_dir: Optional[str] = None, total_steps: Optional[int] = None,
               backend: Any = None):
    self._lock = threading.Lock()
    self._run_dir = None if run_dir is None else str(run_dir)
    self._backend = backend
    self._fields: dict[str, Any] = {}
    if total_steps is not None:
      self._fields['total_steps'] = int(total_steps)
    self._phase, self._error = 'starting', None
    self._started = time.time()
    self._extra: dict[str, Any] = {}

  def update(self, **fields) -> None:
    with self._lock:
      self._fields.update(fields)

  def set_extra(self, **fields) -> None:
    """Fields shown as they are (pids, addresses), never derived from the run directory."""
    with self._lock:
      self._extra.update(fields)

  def set_phase(self, phase: str, error: Optional[str] = None) -> None:
    if phase not in PHASES:
      raise ValueError(f'Unknown phase {phase!r}; one of {PHASES}.')
    with self._lock:
      self._phase, self._error = phase, error

  def phase(self) -> str:
    with self._lock:
      return self._phase

  def attach_backend(self, backend: Any) -> None:
    with self._lock:
      self._backend = backend

  def snapshot(self) -> dict:
    with self._lock:
      run_dir, backend = self._run_dir, self._backend
      fields, extra = dict(self._fields), dict(self._extra)
      phase, error, started = self._phase, self._error, self._started
    now = time.time()
    if run_dir is not None:
      snap = status_from_run_dir(run_dir, backend=backend, now=now)
    else:
      snap = {'run_dir': None, 'time': now, 'workers': [], 'phase': phase}
      if backend is not None:
        try:
          snap.update(_backend_fields(backend.status()))
        except Exception as e:
          snap['backend_error'] = f'{type(e).__name__}: {e}'
    snap.update({k: v for k, v in fields.items() if v is not None})
    if snap.get('eta_s') is None and snap.get('run_progress'):
      # A run without steps (Label Solve) has its ETA from its kernel pairs.
      snap['eta_s'] = snap['run_progress'].get('eta_s')
    # The holder's phase wins once it is past 'starting' (a resumed run's directory may still
    # hold the summary of an earlier, shorter run); before that the directory tells.
    if phase != 'starting' or not snap.get('phase'):
      snap['phase'] = phase
    if error:
      snap['error'] = error
    snap['coordinator_uptime_s'] = now - started
    if snap.get('elapsed_s') is None:
      snap['elapsed_s'] = now - started
    snap.update(extra)
    return snap

  def to_bytes(self) -> bytes:
    return encode(self.snapshot())


def encode(snapshot: dict) -> bytes:
  """The RPC answer: UTF-8 JSON (non-finite floats as null)."""
  return json.dumps(_clean(snapshot), sort_keys=True).encode()


def decode(answer) -> dict:
  """A snapshot from a status answer: JSON bytes or text (or an already decoded dict).

  Raises:
    StatusQueryError: the answer is of another type.
  """
  if isinstance(answer, (bytes, bytearray, memoryview)):
    answer = bytes(answer).decode()
  if isinstance(answer, str):
    return json.loads(answer)
  if isinstance(answer, dict):
    return answer
  raise StatusQueryError(f'status() answered {type(answer).__name__}, not JSON bytes.')


def _clean(value):
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, 'item') and callable(value.item):   # numpy scalars
    try:
      return _clean(value.item())
    except (TypeError, ValueError):
      return str(value)
  if value is None or isinstance(value, (str, int, bool)):
    return value
  return str(value)


# -- Publishing through the run directory. -------------------------------------------------------

@contextlib.contextmanager
def unix_socket_address(path: Path) -> Iterator[str]:
  """`path` as a Unix socket address to bind or connect to: as is, or through /proc/self/fd
  when it is longer than sun_path (108 bytes) allows."""
  path = Path(path)
  if len(os.fsencode(str(path))) < 100:
    yield str(path)
    return
  fd = os.open(path.parent, os.O_PATH)
  try:
    yield f'/proc/self/fd/{fd}/{path.name}'
  finally:
    os.close(fd)


def _bind_private_socket(path: Path) -> socket.socket:
  """A listening Unix socket at `path`, mode 0600 from the moment it is reachable there: bound
  in a fresh 0700 folder, chmod-ed, then renamed into place (replacing a stale one)."""
  folder = tempfile.mkdtemp(prefix='.status-sock-', dir=path.parent)
  server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  try:
    bound = Path(folder) / 's'
    with unix_socket_address(bound) as address:
      server.bind(address)
    os.chmod(bound, 0o600)
    server.listen(16)
    os.replace(bound, path)
  except BaseException:
    server.close()
    raise
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  return server


def _peer_uid(conn: socket.socket) -> Optional[int]:
  try:
    _, uid, _ = struct.unpack('3i', conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    struct.calcsize('3i')))
    return uid
  except (OSError, AttributeError):
    return None


class StatusPublisher:
  """Gives a `RunStatus` to this machine through the run directory, without any network.

  Serves the snapshot (JSON) to each connection on RUN_DIR/status.sock, which is mode 0600 and
  answers only its owner's uid (and root); keeps RUN_DIR/status.json, atomically replaced every
  `every_s` seconds. `finish` records how the run ended (phase, error, `ended`), writes the
  final snapshot and removes the socket. Publishing never fails the run: a problem is logged.
  One thread; `serve=False` writes only the snapshot.
  """

  def __init__(self, holder: 'RunStatus', run_dir: str, every_s: float = SNAPSHOT_EVERY_S,
               serve: bool = True):
    self.holder, self.run_dir = holder, Path(run_dir)
    self.every_s = float(every_s)
    self.socket_path = self.run_dir / run_files.STATUS_SOCKET
    self.snapshot_path = self.run_dir / run_files.STATUS_JSON
    self._serve = serve
    self._server: Optional[socket.socket] = None
    self._socket_inode: Optional[int] = None
    self._stop = threading.Event()
    self._threads: list[threading.Thread] = []
    self._write_lock = threading.Lock()
    self._finished = False

  def start(self) -> 'StatusPublisher':
    import logging  # pylint: disable=import-outside-toplevel
    self.holder.set_extra(status_pid=os.getpid(), status_host=socket.gethostname(),
                          status_socket=str(self.socket_path) if self._serve else None)
    if self._serve:
      try:
        self._server = _bind_private_socket(self.socket_path)
        self._server.settimeout(0.25)
        self._socket_inode = self.socket_path.stat().st_ino
      except OSError as e:
        logging.warning('No status socket at %s (%s); status.json is still kept.',
                        self.socket_path, e)
        self.holder.set_extra(status_socket=None)
    self.write_snapshot()
    # Two threads: a slow disk (fsync) never delays an answer on the socket.
    self._threads = [threading.Thread(target=self._snapshots, daemon=True,
                                      name='ntkdd-status-snapshots')]
    if self._server is not None:
      self._threads.append(threading.Thread(target=self._serve_socket, daemon=True,
                                            name='ntkdd-status-socket'))
    for thread in self._threads:
      thread.start()
    return self

  def write_snapshot(self, final: bool = False) -> None:
    import logging  # pylint: disable=import-outside-toplevel
    try:
      snap = self.holder.snapshot()
      snap['snapshot_final'] = final
      with self._write_lock:
        run_files.atomic_write_bytes(self.snapshot_path, encode(snap))
    except Exception as e:  # a full disk must not end the run
      logging.warning('Could not write %s: %s', self.snapshot_path, e)

  def _snapshots(self) -> None:
    while not self._stop.wait(self.every_s):
      self.write_snapshot()

  def _serve_socket(self) -> None:
    while not self._stop.is_set():
      self._answer_one()

  def _answer_one(self) -> None:
    try:
      conn, _ = self._server.accept()
    except (socket.timeout, OSError):
      return
    with conn:
      uid = _peer_uid(conn)
      if uid is not None and uid not in (os.getuid(), 0):
        return    # the file mode already keeps others out; this is the second lock
      try:
        conn.settimeout(5.0)
        conn.sendall(self.holder.to_bytes())
      except OSError:
        pass      # the client went away

  def finish(self, error: Optional[BaseException] = None) -> None:
    """Records the end (`error`: what ended the run, None for success), writes the final
    snapshot and stops serving. Only the first call counts."""
    if self._finished:
      return
    self._finished = True
    if error is None:
      if self.holder.phase() not in ENDED_PHASES:
        self.holder.set_phase('done')
    elif type(error).__name__ == 'Interrupted' or isinstance(error, KeyboardInterrupt):
      self.holder.set_phase('interrupted', str(error) or 'Interrupted.')
    else:
      self.holder.set_phase('failed', f'{type(error).__name__}: {error}')
    self.holder.set_extra(ended=time.time())
    self._stop.set()
    for thread in self._threads:
      thread.join(10)
    self.write_snapshot(final=True)
    if self._server is not None:
      self._server.close()
      try:   # only our own socket: a newer coordinator may have replaced it
        if self.socket_path.stat().st_ino == self._socket_inode:
          self.socket_path.unlink()
      except OSError:
        pass


@contextlib.contextmanager
def publishing(holder: 'RunStatus', run_dir: str, **kwargs) -> Iterator[StatusPublisher]:
  """A started `StatusPublisher` for the block; finished with the block's exception (if any)."""
  publisher = StatusPublisher(holder, run_dir, **kwargs).start()
  try:
    yield publisher
  except BaseException as e:
    publisher.finish(e)
    raise
  publisher.finish()


@contextlib.contextmanager
def published(run_status: Optional['RunStatus'], run_dir: str,
              total_steps: Optional[int]) -> Iterator['RunStatus']:
  """The run's status holder for the block: the caller's `run_status` (which the caller
  publishes), else a new one published on RUN_DIR/status.sock and status.json (phase
  'running', finished with the block's exception). Either way long kernel computations
  (KRR evaluations) report their progress to it."""
  holder, publisher = run_status, None
  if holder is None:
    holder = RunStatus(str(run_dir), total_steps=total_steps)
    publisher = StatusPublisher(holder, str(run_dir)).start()
    holder.set_phase('running')
  progress_to = KERNEL_PROGRESS_HOLDER.set(holder)
  try:
    yield holder
  except BaseException as e:
    if publisher is not None:
      publisher.finish(e)   # the final status.json says how the run ended
    raise
  finally:
    KERNEL_PROGRESS_HOLDER.reset(progress_to)
  if publisher is not None:
    publisher.finish()
