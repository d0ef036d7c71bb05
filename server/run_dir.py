"""The run directory: the name of every file a run keeps there, its atomic writers and readers.

A run directory (`ntkdd distill --out DIR`) holds what the run made (config.json, metrics.jsonl,
checkpoint.npz, support.npz, summary.json; evaluation.json from `ntkdd evaluate`; support.png and
curves.png from `ntkdd show`; TensorBoard event files with --tensorboard), how it can be asked
(status.json, status.sock) and what its launcher left (coordinator_result.json,
coordinator_address.txt, ray_address.txt, worker_pids.json, launchpad_processes.json,
launchpad_spec.json, launchpad_logs/). Every module names these files through this one.
Writes are atomic (write, fsync, rename: a crash leaves the old file or the new one); readers
are forgiving where a live run may be mid-write (`read_json`, `read_metrics`) and strict, with
one clear error, where a command needs the file (`read_json_object`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# What the run made.
CONFIG = 'config.json'               # the flags and the dataset's fingerprint; written first
METRICS = 'metrics.jsonl'            # one JSON record per step (appended)
CHECKPOINT = 'checkpoint.npz'        # what --resume continues from (server/checkpoint.py)
SUPPORT = 'support.npz'              # the distilled set
SUMMARY = 'summary.json'             # written when the run ends
EVALUATION = 'evaluation.json'       # `ntkdd evaluate`'s default --out
SUPPORT_PNG = 'support.png'          # `ntkdd show` / the end of a run: the support grid
CURVES_PNG = 'curves.png'            # ... and the training curves
TENSORBOARD_EVENTS = 'events.out.tfevents.*'   # --tensorboard (tensorboardX names the files)
# How a run can be asked (server/status.py).
STATUS_JSON = 'status.json'          # the latest status snapshot; at the end, the final one
STATUS_SOCKET = 'status.sock'        # the live status, for processes of this machine
# What the launchers leave (launch/).
COORDINATOR_RESULT = 'coordinator_result.json'   # ok / error / interrupted, when it ends
COORDINATOR_ADDRESS_FILE = 'coordinator_address.txt'   # HOST:PORT of the Courier status RPC
RAY_ADDRESS_FILE = 'ray_address.txt'             # the Ray cluster's address, then the run name
WORKER_PIDS = 'worker_pids.json'                 # {'coordinator': pid, 'workers': {i: pid}}
LAUNCHPAD_PROCESSES = 'launchpad_processes.json'  # the launcher's pids and network namespace
LAUNCHPAD_SPEC = 'launchpad_spec.json'           # what the launcher process was asked to run
LAUNCHPAD_LOGS = 'launchpad_logs'                # a folder: each node's output, and
LAUNCHER_LOG = 'launcher.log'                    # ... the launcher's own, and
LAUNCHPAD_NETNS = 'netns'                        # ... the network namespace it entered

# The files that make a directory a run's: a fresh run refuses a directory holding any of them,
# --overwrite removes them.
RUN_FILES = (CONFIG, CHECKPOINT, SUPPORT, SUMMARY, METRICS)

_LOG = logging.getLogger(__name__)


# -- Writers (atomic). ----------------------------------------------------------------------

def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Write then rename, so a crash leaves the old file or the new one, never half of one."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: PathLike, text: str) -> None:
  """`text` (UTF-8) to `path`, atomically."""
  atomic_write_bytes(path, text.encode())


def write_json(path: PathLike, obj: Any) -> None:
  """`obj` as indented, key-sorted JSON, atomically; numpy values become plain numbers/lists."""
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=jsonable) + '\n')
                     .encode())


def jsonable(value: Any) -> Any:
  """`json.dumps(default=...)`: numpy scalars and arrays as Python values, the rest as str."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def save_npz(path: PathLike, arrays: dict) -> None:
  """`arrays` as an uncompressed .npz, atomically."""
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic_write_bytes(path, buffer.getvalue())


def append_metrics(path: PathLike, record: dict) -> None:
  """One JSON line appended to metrics.jsonl (a crash can tear only this last line)."""
  with open(path, 'a') as f:
    f.write(json.dumps(record, default=jsonable) + '\n')
    f.flush()


def truncate_metrics(path: PathLike, last_step: int) -> None:
  """Drops records past the checkpoint's step, so a resumed run counts no step twice."""
  path = Path(path)
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a torn last line from a killed run
    if record.get('step', 0) <= last_step:
      kept.append(line)
  atomic_write_bytes(path, ('\n'.join(kept) + ('\n' if kept else '')).encode())


# -- Readers. -------------------------------------------------------------------------------

def read_json(path: PathLike) -> Optional[Any]:
  """The JSON in `path`, or None where it is missing or unreadable (a live run's view)."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None


def read_json_object(path: PathLike) -> dict:
  """The JSON object in `path`, for a command that needs it.

  Raises:
    ValueError: the file is not valid JSON, or holds something other than an object.
    OSError: the file cannot be read.
  """
  path = Path(path)
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); was the run interrupted while writing '
                     f'it?') from e
  if not isinstance(value, dict):
    raise ValueError(f'{path} should hold a JSON object, found {type(value).__name__}.')
  return value


def read_optional_json_object(path: PathLike) -> Optional[dict]:
  """`read_json_object`, or None where the file is missing or damaged (logged as a warning)."""
  if not Path(path).exists():
    return None
  try:
    return read_json_object(path)
  except ValueError as e:
    _LOG.warning('Ignoring %s', e)
    return None


def read_metrics(run_dir: PathLike, warn: bool = False) -> list[dict]:
  """The records of RUN_DIR/metrics.jsonl, in file order; [] where it does not exist yet.

  Args:
    run_dir: the run directory.
    warn: log each skipped line as a warning (the default skips quietly: a status snapshot
      reads the file every few seconds while the run appends to it).

  Returns:
    One dict per readable line; a torn last line (a crash mid-append) and unreadable lines are
    skipped.
  """
  path = Path(run_dir) / METRICS
  try:
    text = path.read_text()
  except OSError:
    return []
  lines = [line for line in text.splitlines() if line.strip()]
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if warn:
        where = 'torn last line' if number == len(lines) else f'unreadable line {number}'
        _LOG.warning('%s: skipping %s (%d characters).', path, where, len(line))
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def mtime(path: PathLike) -> Optional[float]:
  """When `path` was last written, or None where it does not exist."""
  try:
    return Path(path).stat().st_mtime
  except OSError:
    return None
