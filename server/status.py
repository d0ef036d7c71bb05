"""What a running distillation reports: progress, accuracy, throughput, workers, checkpoint.

A snapshot is a JSON-able dict. It is built from the run directory (config.json, metrics.jsonl,
checkpoint.npz, summary.json, coordinator_result.json), which the distill loop already writes
atomically, plus the live kernel backend's `status()` (per-worker health) where one is given.
`RunStatus` is the thread-safe holder a coordinator keeps: its phase, error and any fields set
directly, merged over the run directory's view. `StatusPublisher` gives it to the host without
any network: it serves the snapshot on the Unix socket RUN_DIR/status.sock (mode 0600, so the
file system's permissions are the authentication) and keeps RUN_DIR/status.json, replaced
atomically every few seconds and once more, final, when the run ends. Multi-host Launchpad
programs also serve it over Courier as `status() -> bytes` (JSON, never numpy: Courier hangs on
array arguments and bytes are the safe answer type). `query_status` is the client side: the
socket, else the snapshot (judged against what the run left behind: a summary, a result file,
a writer pid that no longer exists), else the bare run directory; `format_status` is the
human-readable table.
"""
from __future__ import annotations

import contextlib
import contextvars
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

PHASES = ('starting', 'running', 'done', 'failed', 'interrupted')
ENDED_PHASES = ('done', 'failed', 'interrupted', 'crashed')   # 'crashed' is only ever inferred
RESULT_FILE = 'coordinator_result.json'     # written by the Launchpad coordinator when it ends
ADDRESS_FILE = 'coordinator_address.txt'    # HOST:PORT of the coordinator's status RPC
SOCKET_FILE = 'status.sock'                 # the live status, for processes of this machine
SNAPSHOT_FILE = 'status.json'               # the latest (at the end: the final) status
SNAPSHOT_EVERY_S = 5.0


class StatusQueryError(RuntimeError):
  """No status could be had from a coordinator address."""


def _read_json(path: Path) -> Optional[Any]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _read_metrics(path: Path) -> list[dict]:
  records = []
  try:
    text = path.read_text()
  except OSError:
    return records
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue   # a torn last line of a killed run
  return records


def _checkpoint_step(path: Path) -> Optional[int]:
  """The step saved in checkpoint.npz (reads only its small `__meta__` member)."""
  try:
    import numpy as np
    with np.load(path, allow_pickle=False) as f:
      return int(json.loads(f['__meta__'].tobytes().decode())['step'])
  except Exception:  # a checkpoint being replaced, or none: the age still tells a lot
    return None


def _finite(value) -> Optional[float]:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def total_steps(flags: dict) -> Optional[int]:
  """The steps a run's flags ask for; None for Label Solve, which has no steps (its time goes
  to kernel computations, shown as `kernel_progress`)."""
  return None if flags.get('algorithm') == 'ls' else flags.get('steps')


def status_from_run_dir(run_dir: str, backend: Any = None, now: Optional[float] = None) -> dict:
  """A status snapshot of the run in `run_dir`, plus `backend.status()` if a backend is given."""
  run_dir = Path(run_dir)
  now = time.time() if now is None else now
  config = _read_json(run_dir / 'config.json') or {}
  flags = config.get('flags', {})
  records = _read_metrics(run_dir / 'metrics.jsonl')
  summary = _read_json(run_dir / 'summary.json')
  result = _read_json(run_dir / RESULT_FILE)
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
      snap['loss'] = _finite(record['loss'])
    if record.get('pairs_per_second') is not None:
      snap['pairs_per_second'] = _finite(record['pairs_per_second'])
    # KIP/LS log KRR test accuracy; RCIG the finite ConvNet's test accuracy (and, with kernel
    # workers, the KRR test accuracy beside it: last_krr_accuracy).
    accuracy = _finite(record.get('test_accuracy', record.get('krr_test_accuracy')))
    if 'test_accuracy' in record and _finite(record.get('krr_test_accuracy')) is not None:
      snap['last_krr_accuracy'] = _finite(record['krr_test_accuracy'])
    if accuracy is not None:
      if step == 0 and snap['initial_accuracy'] is None:
        snap['initial_accuracy'] = accuracy
      snap['last_accuracy'], snap['last_accuracy_step'] = accuracy, step
      if snap['best_accuracy'] is None or accuracy > snap['best_accuracy']:
        snap['best_accuracy'], snap['best_accuracy_step'] = accuracy, step
  # ETA from the step times of the (at most 20) latest steps; wall_time is cumulative step time.
  timed = [(r['step'], r['wall_time']) for r in records
           if isinstance(r.get('step'), int) and r['step'] > 0 and _finite(r.get('wall_time'))
           is not None]
  if timed:
    recent = timed[-20:]
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
      per_step = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    else:
      per_step = recent[-1][1] / max(recent[-1][0], 1)
    snap['seconds_per_step'] = per_step
    if isinstance(snap['total_steps'], int):
      snap['eta_s'] = max(0, snap['total_steps'] - snap['step']) * per_step
  ckpt = run_dir / 'checkpoint.npz'
  try:
    snap['checkpoint_age_s'] = max(0.0, now - ckpt.stat().st_mtime)
    snap['checkpoint'] = str(ckpt)
    snap['checkpoint_step'] = _checkpoint_step(ckpt)
  except OSError:
    pass
  if records or ckpt.exists():
    snap['phase'] = 'running'
  if summary is not None:
    snap['phase'], snap['eta_s'] = 'done', 0.0
    snap['summary'] = summary
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
        'seconds_since_seen', 'last_error', 'down_for_s', 'pid', 'device')})
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


# -- Progress of long kernel computations. ------------------------------------------------------

# The RunStatus that kernel computations of this context report to (set by distill.distill).
KERNEL_PROGRESS_HOLDER: contextvars.ContextVar = contextvars.ContextVar(
    'ntkdd_kernel_progress_holder', default=None)
KERNEL_LOG_EVERY_S = 30.0


def progress_text(state: dict) -> str:
  """'kernel: 1,234/5,678 pairs (21.7%), 95 pairs/s, ETA 46.7s'."""
  done, total = state.get('pairs_done') or 0, state.get('pairs_total') or 0
  percent = f' ({100 * done / total:.1f}%)' if total else ''
  return (f"{state.get('what', 'kernel')}: {done:,}/{total:,} pairs{percent}, "
          f"{_number(state.get('pairs_per_second'), ',.0f')} pairs/s, "
          f"ETA {_duration(state.get('eta_s'))}")


class KernelProgress:
  """Progress of one kernel computation: pairs done of total, rate and ETA.

  Each update goes to the run's status (field `kernel_progress`, while it lasts) when a
  `RunStatus` is given or set in KERNEL_PROGRESS_HOLDER, and a log line goes out every
  `log_every_s` seconds, terminal or not; a computation shorter than that logs nothing.
  Thread-safe: the coordinator's worker threads report blocks as they arrive.
  """

  def __init__(self, what: str, pairs_total: int, holder: Optional['RunStatus'] = None,
               log_every_s: float = KERNEL_LOG_EVERY_S, clock=time.monotonic):
    self.what, self.pairs_total = what, int(pairs_total)
    self.holder = holder if holder is not None else KERNEL_PROGRESS_HOLDER.get()
    self.log_every_s, self._clock = float(log_every_s), clock
    self.pairs_done = 0
    self._start = self._last_log = clock()
    self._logged = False
    self._lock = threading.Lock()

  def add(self, pairs: int) -> None:
    self.update(self.pairs_done + int(pairs))

  def update(self, pairs_done: int) -> None:
    import logging  # pylint: disable=import-outside-toplevel
    with self._lock:
      self.pairs_done = max(self.pairs_done, int(pairs_done))
      now = self._clock()
      state = self._state(now)
      log = now - self._last_log >= self.log_every_s
      if log:
        self._last_log, self._logged = now, True
    if self.holder is not None:
      self.holder.update(kernel_progress=state)
    if log:
      logging.info('%s', progress_text(state))

  def _state(self, now: float) -> dict:
    elapsed = now - self._start
    rate = self.pairs_done / elapsed if elapsed > 0 and self.pairs_done else None
    left = max(0, self.pairs_total - self.pairs_done)
    return {'what': self.what, 'pairs_done': self.pairs_done, 'pairs_total': self.pairs_total,
            'pairs_per_second': rate, 'eta_s': left / rate if rate else None,
            'elapsed_s': elapsed}

  def close(self) -> None:
    """The end: a last log line if any was logged, and the status field cleared."""
    import logging  # pylint: disable=import-outside-toplevel
    if self._logged:
      logging.info('%s (done)', progress_text(self._state(self._clock())))
    if self.holder is not None:
      self.holder.update(kernel_progress=None)


# -- Publishing through the run directory. -------------------------------------------------------

@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
  """`path` as a Unix socket address: as is, or through /proc/self/fd when it is longer than
  sun_path (108 bytes) allows."""
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
    with _short_path(bound) as address:
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
    self.socket_path = self.run_dir / SOCKET_FILE
    self.snapshot_path = self.run_dir / SNAPSHOT_FILE
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
    from ntkdd.server import checkpoint  # pylint: disable=import-outside-toplevel
    try:
      snap = self.holder.snapshot()
      snap['snapshot_final'] = final
      with self._write_lock:
        checkpoint.atomic_write_bytes(self.snapshot_path, encode(snap))
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


# -- Printing. ----------------------------------------------------------------------------------

def _duration(seconds) -> str:
  seconds = _finite(seconds)
  if seconds is None:
    return '-'
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f'{seconds:.1f}s'
  if seconds < 3600:
    return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'
  return f'{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m'


def _percent(value) -> str:
  value = _finite(value)
  return '-' if value is None else f'{100 * value:.2f}%'


def _number(value, fmt: str = '.4g') -> str:
  value = _finite(value)
  return '-' if value is None else format(value, fmt)


def format_status(snapshot: dict) -> str:
  """A readable table: the run's progress, then one row per kernel worker."""
  s = snapshot
  step, total = s.get('step'), s.get('total_steps')
  step_text = f"{step if step is not None else '-'}/{total if total is not None else '-'}"
  if isinstance(step, int) and isinstance(total, int) and total > 0:
    step_text += f' ({100 * step / total:.0f}%)'
  acc_last = _percent(s.get('last_accuracy'))
  if s.get('last_accuracy_step') is not None:
    acc_last += f" (step {s['last_accuracy_step']})"
  acc_best = _percent(s.get('best_accuracy'))
  if s.get('best_accuracy_step') is not None:
    acc_best += f" (step {s['best_accuracy_step']})"
  ckpt = '-'
  if s.get('checkpoint_age_s') is not None:
    ckpt = f"{_duration(s['checkpoint_age_s'])} ago"
    if s.get('checkpoint_step') is not None:
      ckpt += f" (step {s['checkpoint_step']})"
  what = ' '.join(str(x) for x in (s.get('algorithm'), s.get('dataset')) if x)
  if s.get('ipc'):
    what += f" ipc={s['ipc']}"
  rows = [
      ('run', f"{s.get('run_dir') or '-'}" + (f'  [{what}]' if what else '')),
      ('phase', str(s.get('phase') or '-') + (f"  error: {s['error']}" if s.get('error') else '')),
      ('step', step_text),
      ('loss', _number(s.get('loss'))),
      ('NN test acc' if s.get('algorithm') == 'rcig' else 'KRR test acc',
       f"last {acc_last}, best {acc_best}, initial {_percent(s.get('initial_accuracy'))}"),
      ('kernel pairs/s', _number(s.get('pairs_per_second'), ',.0f')),
      *([('KRR test acc', f"last {_percent(s['last_krr_accuracy'])} (infinite-width ConvNet "
                          f"NTK)")] if s.get('last_krr_accuracy') is not None else []),
      ('elapsed', _duration(s.get('elapsed_s'))),
      ('ETA', _duration(s.get('eta_s'))),
      ('checkpoint', ckpt),
  ]
  if s.get('ended'):
    rows.insert(2, ('ended', time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['ended']))
                    + f" ({_duration(time.time() - s['ended'])} ago)"))
  if s.get('kernel_progress') and s.get('phase') not in ENDED_PHASES:
    rows.append(('kernel', progress_text(s['kernel_progress'])))
  if s.get('coordinator_pid') or s.get('address'):
    rows.append(('coordinator', f"{s.get('address') or '-'} pid {s.get('coordinator_pid') or '-'}"))
  source = s.get('source')
  if source == 'socket':
    rows.append(('source', f"{SOCKET_FILE} (live)"))
  elif source == 'snapshot':
    rows.append(('source', f"{SNAPSHOT_FILE}, written {_duration(s.get('source_age_s'))} ago"
                 + (' (the final one)' if s.get('snapshot_final') else '')
                 + (f"; live status unavailable: {s['socket_error']}" if s.get('socket_error')
                    else '')))
  elif source == 'run_dir':
    rows.append(('source', f'the run directory\'s files (no {SNAPSHOT_FILE})'))
  width = max(len(k) for k, _ in rows)
  lines = [f'{k.ljust(width)}  {v}' for k, v in rows]
  workers = s.get('workers') or []
  if workers:
    alive = s.get('alive_workers')
    lines.append('')
    lines.append(f"workers: {len(workers)}" + (f', {alive} alive' if alive is not None else ''))
    header = ('id', 'alive', 'blocks', 'failures', 'last seen', 'pid', 'last error')
    table = [header]
    for w in workers:
      seen = w.get('seconds_since_seen')
      table.append((str(w.get('worker', '-')), 'yes' if w.get('alive') else 'NO',
                    str(w.get('blocks_done', '-')), str(w.get('failures', 0) or 0),
                    '-' if seen is None else f'{_duration(seen)} ago',
                    str(w.get('pid') or '-'), _short(w.get('last_error'))))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
      lines.append('  '.join(c.ljust(widths[i]) for i, c in enumerate(row[:-1])) + '  ' + row[-1])
  return '\n'.join(lines)


def _short(text, limit: int = 80) -> str:
  if not text:
    return '-'
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


# -- The client. ------------------------------------------------------------------------------

def resolve_address(address: str) -> str:
  """HOST:PORT as given, or read from a run directory's coordinator_address.txt."""
  path = Path(address)
  if path.is_dir():
    try:
      return (path / ADDRESS_FILE).read_text().strip()
    except OSError:
      raise StatusQueryError(f'{address} is a directory without {ADDRESS_FILE}: no Launchpad '
                             f'coordinator has started there.') from None
  if ':' not in address:
    raise StatusQueryError(f'--address needs HOST:PORT (or a run directory), got {address!r}.')
  return address


def query_socket(path, timeout_s: float = 10) -> dict:
  """The live status served on a run directory's status.sock (see `StatusPublisher`)."""
  chunks = []
  with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
    client.settimeout(float(timeout_s))
    with _short_path(Path(path)) as address:
      client.connect(address)
    while True:
      chunk = client.recv(1 << 16)
      if not chunk:
        break
      chunks.append(chunk)
  if not chunks:
    raise StatusQueryError(f'{path} closed the connection without an answer (another user '
                           f'than the run\'s?).')
  return decode(b''.join(chunks))


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True    # someone's process: not ours to judge
  try:   # a zombie has ended
    with open(f'/proc/{int(pid)}/stat') as f:
      return f.read().rsplit(')', 1)[-1].split()[0] != 'Z'
  except OSError:
    return True


def _mtime(path: Path) -> Optional[float]:
  try:
    return path.stat().st_mtime
  except OSError:
    return None


def _settle(snap: dict, run_dir: Path, now: float) -> dict:
  """`snap` (a snapshot file's or the run directory's view) judged against what the run left
  behind: a run that has ended shows as done, interrupted, failed or crashed, with when and
  why, its elapsed time frozen at its end and no ETA."""
  snap = dict(snap)
  phase = snap.get('phase')
  ended = snap.get('ended')
  summary_time = _mtime(run_dir / 'summary.json')
  result = _read_json(run_dir / RESULT_FILE)
  if phase not in ENDED_PHASES and result is not None:
    phase = 'done' if result.get('ok') else ('interrupted' if result.get('interrupted')
                                             else 'failed')
    snap['error'] = snap.get('error') or result.get('error')
    ended = ended or _mtime(run_dir / RESULT_FILE)
  if phase not in ENDED_PHASES and summary_time is not None and (
      ended is None or summary_time >= snap.get('time', 0)):
    phase, ended = 'done', ended or summary_time
  if phase not in ENDED_PHASES:
    pid, host = snap.get('status_pid'), snap.get('status_host')
    if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
      phase, ended = 'crashed', snap.get('time')
      snap['error'] = (f'the process that ran it (pid {pid}) is gone without recording an end '
                       f'(killed, or the machine stopped); its last status is from '
                       f'{_duration(now - (snap.get("time") or now))} ago. Continue with '
                       f'--resume.')
    elif pid is None:   # no process to ask (a run without status.json: RCIG, older ntkdd)
      last = max((t for t in (_mtime(run_dir / name) for name in (
          'metrics.jsonl', 'checkpoint.npz', 'config.json')) if t), default=None)
      quiet_s = None if last is None else now - last
      # Written to within a few steps' time: probably running; else nobody can tell.
      recent_s = max(300.0, 5 * (_finite(snap.get('seconds_per_step')) or 0.0))
      if quiet_s is not None and quiet_s <= recent_s:
        snap['error'] = (f'no live status (no {SNAPSHOT_FILE}); judged running from the run '
                         f'directory, last written {_duration(quiet_s)} ago.')
      else:
        phase = 'unknown'
        snap['error'] = (f'no live status (no {SNAPSHOT_FILE}) and the run directory was last '
                         f'written {_duration(quiet_s)} ago: ntkdd cannot tell whether this '
                         f'run still runs or was stopped.')
        snap['eta_s'] = None
  snap['phase'] = phase
  if phase in ENDED_PHASES:
    snap['eta_s'] = 0.0 if phase == 'done' else None
    if ended is None:   # a run without a final snapshot: its last file tells when it ended
      ended = summary_time or _mtime(run_dir / RESULT_FILE) or _mtime(run_dir / 'metrics.jsonl')
    if ended is not None:
      snap['ended'] = ended
      if snap.get('elapsed_s') is not None and not snap.get('snapshot_final'):
        # elapsed_s was measured at snap['time']: the run's time is up to its end only.
        started = snap.get('time', now) - snap['elapsed_s']
        snap['elapsed_s'] = max(0.0, ended - started)
  return snap


def status_of_run_dir(run_dir, timeout_s: float = 10) -> dict:
  """The status of the run in `run_dir` from this machine, without any network: its live
  status.sock; else its status.json snapshot, settled against what the run left behind; else
  the run directory's files. `source` says which, `source_age_s` how old it is."""
  run_dir = Path(run_dir)
  now = time.time()
  why_not_live = None
  sock = run_dir / SOCKET_FILE
  for attempt in range(3):
    if not sock.exists():
      break
    try:
      snap = query_socket(sock, timeout_s)
      return {**snap, 'source': 'socket', 'source_age_s': max(0.0, now - snap.get('time', now))}
    except PermissionError as e:
      why_not_live = f'{sock}: {e.strerror} (it answers only the user that runs the run)'
      break
    except (ConnectionRefusedError, FileNotFoundError) as e:   # nobody serves it any more
      why_not_live = f'{sock}: {e.strerror or e}'
      break
    except (OSError, ValueError, StatusQueryError) as e:   # busy, or cut short: ask again
      why_not_live = f'{sock}: {e}'
      time.sleep(0.2 * (attempt + 1))
  snapshot = _read_json(run_dir / SNAPSHOT_FILE)
  if isinstance(snapshot, dict):
    snap = _settle(snapshot, run_dir, now)
    snap.update(source='snapshot', source_age_s=max(0.0, now - snapshot.get('time', now)))
  elif (run_dir / 'config.json').exists():
    snap = _settle(status_from_run_dir(str(run_dir), now=now), run_dir, now)
    snap.update(source='run_dir', source_age_s=None)
  elif (run_dir / SNAPSHOT_FILE).exists():
    raise StatusQueryError(f'{run_dir / SNAPSHOT_FILE} cannot be read (it is readable only by '
                           f'the user that runs the run).')
  else:
    raise StatusQueryError(f'{run_dir} holds no run: no {SOCKET_FILE}, {SNAPSHOT_FILE} or '
                           f'config.json.')
  if why_not_live:
    snap['socket_error'] = why_not_live
  return snap


def query_status(address: str, timeout_s: float = 10) -> dict:
  """The status of a run directory (see `status_of_run_dir`; no network), or of the
  coordinator serving Courier RPC `status()` at HOST:PORT (multi-host programs)."""
  path = Path(address)
  if path.is_dir():
    return status_of_run_dir(path, timeout_s)
  if ':' not in address:
    raise StatusQueryError(f'Give a run directory, or HOST:PORT of a coordinator (multi-host '
                           f'Launchpad) with --address; got {address!r}.')
  try:
    import courier  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('ntkdd status needs Courier, which comes with Launchpad: '
                      "pip install 'ntkdd[launchpad]' (Python 3.10; see "
                      'constraints/launchpad.txt).') from e
  # wait_for_ready=False: an address nobody serves fails at once instead of waiting.
  client = courier.Client(address, call_timeout=float(timeout_s), wait_for_ready=False)
  box: dict = {}

  def call():
    try:
      box['answer'] = client.status()
    except BaseException as e:  # reported below
      box['error'] = e

  # Courier's call timeout bounds the RPC; the thread bounds everything else too.
  thread = threading.Thread(target=call, daemon=True, name='ntkdd-status-query')
  thread.start()
  thread.join(float(timeout_s) + 5)
  if thread.is_alive():
    raise StatusQueryError(f'No status answer from {address} within {timeout_s:g} s.')
  if 'error' in box:
    raise StatusQueryError(f'No status from {address}: {type(box["error"]).__name__}: '
                           f'{box["error"]}') from box['error']
  return decode(box['answer'])


def main(argv=None) -> int:
  """`python -m ntkdd.server.status HOST:PORT|RUN_DIR [--json]` (what `ntkdd status` does)."""
  import argparse
  import sys
  p = argparse.ArgumentParser(prog='ntkdd status', description=__doc__.splitlines()[0])
  p.add_argument('address', help='a run directory, or HOST:PORT of a coordinator.')
  p.add_argument('--json', action='store_true', help='print the raw JSON snapshot.')
  p.add_argument('--timeout', type=float, default=10, help='seconds to wait for an answer.')
  args = p.parse_args(argv)
  try:
    snap = query_status(args.address, timeout_s=args.timeout)
  except (StatusQueryError, ImportError) as e:
    print(f'ntkdd status: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(snap, indent=2, sort_keys=True) if args.json else format_status(snap))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
