"""What `ntkdd status` does: fetch a run's status (socket, snapshot, Courier) and print it.

The payload and its publication are server/status.py's; this module only asks. For a run
directory it needs no network: the live RUN_DIR/status.sock, else the status.json snapshot
judged against what the run left behind (a summary, a result file, a writer pid that no longer
exists), else the run directory's files. A multi-host Launchpad coordinator is asked over
Courier at HOST:PORT (`status() -> bytes`); a Ray run's coordinator actor by
launch/ray_status.py's `query_ray_status`. `format_status` is the human-readable table.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ntkdd.server import run_dir as run_files
from ntkdd.server import status
from ntkdd.server.deadline import DeadlineExceeded, call_with_deadline
from ntkdd.server.progress import finite_or_none, format_duration, progress_text
from ntkdd.server.status import ENDED_PHASES, StatusQueryError

DEFAULT_TIMEOUT_S = 10.0


# -- Fetching. ------------------------------------------------------------------------------

def resolve_address(address: str) -> str:
  """HOST:PORT as given, or read from a run directory's coordinator_address.txt.

  Raises:
    StatusQueryError: a directory without that file, or an address without a port.
  """
  path = Path(address)
  if path.is_dir():
    try:
      return (path / run_files.COORDINATOR_ADDRESS_FILE).read_text().strip()
    except OSError:
      raise StatusQueryError(f'{address} is a directory without '
                             f'{run_files.COORDINATOR_ADDRESS_FILE}: no Launchpad coordinator '
                             f'has started there.') from None
  if ':' not in address:
    raise StatusQueryError(f'--address needs HOST:PORT (or a run directory), got {address!r}.')
  return address


def query_socket(path, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
  """The live status served on a run directory's status.sock (see `status.StatusPublisher`)."""
  chunks = []
  with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
    client.settimeout(float(timeout_s))
    with status.unix_socket_address(Path(path)) as address:
      client.connect(address)
    while True:
      chunk = client.recv(1 << 16)
      if not chunk:
        break
      chunks.append(chunk)
  if not chunks:
    raise StatusQueryError(f'{path} closed the connection without an answer (another user '
                           f'than the run\'s?).')
  return status.decode(b''.join(chunks))


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


def _settle(snap: dict, run_dir: Path, now: float) -> dict:
  """`snap` (a snapshot file's or the run directory's view) judged against what the run left
  behind: a run that has ended shows as done, interrupted, failed or crashed, with when and
  why, its elapsed time frozen at its end and no ETA."""
  snap = dict(snap)
  phase = snap.get('phase')
  ended = snap.get('ended')
  result_path = run_dir / run_files.COORDINATOR_RESULT
  summary_time = run_files.mtime(run_dir / run_files.SUMMARY)
  result = run_files.read_json(result_path)
  if phase not in ENDED_PHASES and result is not None:
    phase = 'done' if result.get('ok') else ('interrupted' if result.get('interrupted')
                                             else 'failed')
    snap['error'] = snap.get('error') or result.get('error')
    ended = ended or run_files.mtime(result_path)
  if phase not in ENDED_PHASES and summary_time is not None and (
      ended is None or summary_time >= snap.get('time', 0)):
    phase, ended = 'done', ended or summary_time
  if phase not in ENDED_PHASES:
    pid, host = snap.get('status_pid'), snap.get('status_host')
    if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
      phase, ended = 'crashed', snap.get('time')
      snap['error'] = (f'the process that ran it (pid {pid}) is gone without recording an end '
                       f'(killed, or the machine stopped); its last status is from '
                       f'{format_duration(now - (snap.get("time") or now))} ago. Continue with '
                       f'--resume.')
    elif pid is None:   # no process to ask (a run without status.json: RCIG, older ntkdd)
      last = max((t for t in (run_files.mtime(run_dir / name) for name in (
          run_files.METRICS, run_files.CHECKPOINT, run_files.CONFIG)) if t), default=None)
      quiet_s = None if last is None else now - last
      # Written to within a few steps' time: probably running; else nobody can tell.
      recent_s = max(300.0, 5 * (finite_or_none(snap.get('seconds_per_step')) or 0.0))
      if quiet_s is not None and quiet_s <= recent_s:
        snap['error'] = (f'no live status (no {run_files.STATUS_JSON}); judged running from the '
                         f'run directory, last written {format_duration(quiet_s)} ago.')
      else:
        phase = 'unknown'
        snap['error'] = (f'no live status (no {run_files.STATUS_JSON}) and the run directory was '
                         f'last written {format_duration(quiet_s)} ago: ntkdd cannot tell '
                         f'whether this run still runs or was stopped.')
        snap['eta_s'] = None
  snap['phase'] = phase
  if phase in ENDED_PHASES:
    snap['eta_s'] = 0.0 if phase == 'done' else None
    if ended is None:   # a run without a final snapshot: its last file tells when it ended
      ended = (summary_time or run_files.mtime(result_path)
               or run_files.mtime(run_dir / run_files.METRICS))
    if ended is not None:
      snap['ended'] = ended
      if snap.get('elapsed_s') is not None and not snap.get('snapshot_final'):
        # elapsed_s was measured at snap['time']: the run's time is up to its end only.
        started = snap.get('time', now) - snap['elapsed_s']
        snap['elapsed_s'] = max(0.0, ended - started)
  return snap


def status_of_run_dir(run_dir, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
  """The status of the run in `run_dir` from this machine, without any network.

  Args:
    run_dir: the run directory (any launch type).
    timeout_s: how long to wait for the live socket's answer.

  Returns:
    The snapshot from its live status.sock; else its status.json snapshot, settled against
    what the run left behind; else one made from the run directory's files. `source` says
    which ('socket', 'snapshot', 'run_dir'), `source_age_s` how old it is, `socket_error` why
    a socket that exists did not answer.

  Raises:
    StatusQueryError: the directory holds no run, or its snapshot cannot be read.
  """
  run_dir = Path(run_dir)
  now = time.time()
  why_not_live = None
  sock = run_dir / run_files.STATUS_SOCKET
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
  snapshot_path = run_dir / run_files.STATUS_JSON
  snapshot = run_files.read_json(snapshot_path)
  if isinstance(snapshot, dict):
    snap = _settle(snapshot, run_dir, now)
    snap.update(source='snapshot', source_age_s=max(0.0, now - snapshot.get('time', now)))
  elif (run_dir / run_files.CONFIG).exists():
    snap = _settle(status.status_from_run_dir(str(run_dir), now=now), run_dir, now)
    snap.update(source='run_dir', source_age_s=None)
  elif snapshot_path.exists():
    raise StatusQueryError(f'{snapshot_path} cannot be read (it is readable only by the user '
                           f'that runs the run).')
  else:
    raise StatusQueryError(f'{run_dir} holds no run: no {run_files.STATUS_SOCKET}, '
                           f'{run_files.STATUS_JSON} or {run_files.CONFIG}.')
  if why_not_live:
    snap['socket_error'] = why_not_live
  return snap


def query_status(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
  """The status of a run directory (`status_of_run_dir`; no network), or of the coordinator
  serving Courier RPC `status()` at HOST:PORT (multi-host Launchpad programs).

  Raises:
    StatusQueryError: no status could be had (the message says why).
    ImportError: HOST:PORT without Courier installed.
  """
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
  # Courier's call timeout bounds the RPC; the deadline bounds everything else too.
  try:
    answer = call_with_deadline(client.status, float(timeout_s) + 5, name='ntkdd-status-query')
  except DeadlineExceeded:
    raise StatusQueryError(f'No status answer from {address} within {timeout_s:g} s.') from None
  except Exception as e:  # pylint: disable=broad-except
    raise StatusQueryError(f'No status from {address}: {type(e).__name__}: {e}') from e
  return status.decode(answer)


def print_status(address: str, as_json: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
  """`ntkdd status RUN_DIR|--address HOST:PORT [--json]`: prints the status; the exit code."""
  try:
    snap = query_status(address, timeout_s=timeout_s)
  except (StatusQueryError, ImportError) as e:
    print(f'ntkdd status: error: {e}', file=sys.stderr)
    return 2
  show(snap, as_json)
  return 0


def show(snapshot: dict, as_json: bool = False) -> None:
  """Prints a status snapshot: as JSON, or as the `ntkdd status` table."""
  print(json.dumps(snapshot, indent=2, sort_keys=True) if as_json else format_status(snapshot))


# -- Printing. ------------------------------------------------------------------------------

def _percent(value) -> str:
  value = finite_or_none(value)
  return '-' if value is None else f'{100 * value:.2f}%'


def _number(value, fmt: str = '.4g') -> str:
  value = finite_or_none(value)
  return '-' if value is None else format(value, fmt)


def _short(text, limit: int = 80) -> str:
  if not text:
    return '-'
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _source_row(s: dict) -> Optional[tuple[str, str]]:
  """Where the snapshot came from, and how old it is."""
  source = s.get('source')
  if source == 'socket':
    return 'source', f'{run_files.STATUS_SOCKET} (live)'
  if source == 'snapshot':
    return 'source', (f"{run_files.STATUS_JSON}, written {format_duration(s.get('source_age_s'))}"
                      f" ago" + (' (the final one)' if s.get('snapshot_final') else '')
                      + (f"; live status unavailable: {s['socket_error']}"
                         if s.get('socket_error') else ''))
  if source == 'run_dir':
    return 'source', f'the run directory\'s files (no {run_files.STATUS_JSON})'
  return None


def _worker_lines(s: dict) -> list[str]:
  """One row per kernel worker: alive, blocks, failures, last seen, pid, its CPU core (when
  workers are pinned: --pin-workers), last error."""
  workers = s.get('workers') or []
  if not workers:
    return []
  alive = s.get('alive_workers')
  lines = ['', f"workers: {len(workers)}" + (f', {alive} alive' if alive is not None else '')]
  pinned = any(w.get('core') is not None for w in workers)
  header = ('id', 'alive', 'blocks', 'failures', 'last seen', 'pid') + (
      ('core',) if pinned else ()) + ('last error',)
  table = [header]
  for w in workers:
    seen = w.get('seconds_since_seen')
    core = (('-' if w.get('core') is None else str(w['core']),) if pinned else ())
    table.append((str(w.get('worker', '-')), 'yes' if w.get('alive') else 'NO',
                  str(w.get('blocks_done', '-')), str(w.get('failures', 0) or 0),
                  '-' if seen is None else f'{format_duration(seen)} ago',
                  str(w.get('pid') or '-')) + core + (_short(w.get('last_error')),))
  widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
  for row in table:
    lines.append('  '.join(c.ljust(widths[i]) for i, c in enumerate(row[:-1])) + '  ' + row[-1])
  return lines


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
    ckpt = f"{format_duration(s['checkpoint_age_s'])} ago"
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
      ('elapsed', format_duration(s.get('elapsed_s'))),
      ('ETA', format_duration(s.get('eta_s'))),
      ('checkpoint', ckpt),
  ]
  if s.get('ended'):
    rows.insert(2, ('ended', time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['ended']))
                    + f" ({format_duration(time.time() - s['ended'])} ago)"))
  if s.get('run_progress') and s.get('phase') not in ENDED_PHASES:
    rows.append(('progress', progress_text(s['run_progress'])))
  if s.get('kernel_progress') and s.get('phase') not in ENDED_PHASES:
    rows.append(('kernel', progress_text(s['kernel_progress'])))
  if s.get('coordinator_pid') or s.get('address'):
    rows.append(('coordinator', f"{s.get('address') or '-'} pid {s.get('coordinator_pid') or '-'}"))
  source = _source_row(s)
  if source is not None:
    rows.append(source)
  width = max(len(k) for k, _ in rows)
  return '\n'.join([f'{k.ljust(width)}  {v}' for k, v in rows] + _worker_lines(s))
