"""A run's checkpoint (one .npz: the arrays and a JSON meta record) and the checks that open a
run directory for a fresh, resumed or overwritten run; input .npz/.npy files read with one
clear error. File names, writers and readers: server/run_dir.py."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ntkdd.server import run_dir as run_files
from ntkdd.server.run_dir import CHECKPOINT, CONFIG, RUN_FILES, SUMMARY, SUPPORT

# What every checkpoint's meta record holds (KIP and RCIG).
META_KEYS = ('step', 'rng_state', 'elapsed', 'before', 'best')
META_MEMBER = '__meta__'   # the .npz member holding the meta record (UTF-8 JSON as uint8)
_NPZ_MAGIC = b'PK'
_NPY_MAGIC = b'\x93NUMPY'


def save_checkpoint(run_dir: Path, arrays: dict, meta: dict) -> Path:
  """One file holds the arrays and a JSON `meta` (step, rng state, ...)."""
  path = Path(run_dir) / CHECKPOINT
  payload = dict(arrays)
  payload[META_MEMBER] = np.frombuffer(json.dumps(meta, default=run_files.jsonable).encode(),
                                       np.uint8)
  run_files.save_npz(path, payload)
  return path


def checkpoint_step(path: Path) -> Optional[int]:
  """The step saved in the checkpoint at `path` (reads only its small meta member); None where
  there is none or it cannot be read (a checkpoint being replaced: the file's age still tells
  a lot)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return int(_decode_meta(f[META_MEMBER])['step'])
  except Exception:  # pylint: disable=broad-except
    return None


def _decode_meta(member: np.ndarray) -> Any:
  return json.loads(member.tobytes().decode())


def load_checkpoint(run_dir: Path, arrays_needed: Sequence[str] = ()) -> Optional[tuple]:
  """(arrays, meta), or None where the run has no checkpoint yet. A damaged file, or one
  without its meta record or `arrays_needed`, is a ValueError naming the file."""
  path = Path(run_dir) / CHECKPOINT
  if not path.exists():
    return None
  fix = (f'Restore {path} from a copy, or start the run again with --overwrite (or into a new '
         f'--out directory).')
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise ValueError(f'{path} is damaged or truncated ({type(e).__name__}: {e}). {fix}') from None
  missing = [k for k in (META_MEMBER,) + tuple(arrays_needed) if k not in arrays]
  if missing:
    raise ValueError(f'{path} lacks {", ".join(missing)}: it is not a complete ntkdd '
                     f'checkpoint. {fix}')
  try:
    meta = _decode_meta(arrays.pop(META_MEMBER))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: its meta record is unreadable ({e}). {fix}') from None
  missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
  if missing:
    raise ValueError(f'{path}: its meta record lacks {", ".join(missing)}. {fix}')
  return arrays, meta


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool = False) -> None:
  """Refuses, before anything is written, an --out that cannot take this run: a file or a path
  under one; a directory holding a run's files (`RUN_FILES`) unless resuming or overwriting;
  --resume where there is no run to continue."""
  run_dir = Path(run_dir)
  if resume and overwrite:
    raise ValueError('--resume continues the run in --out and --overwrite replaces it: give '
                     'one of them.')
  existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
  if existing is not None and not existing.is_dir():
    where = 'is a file' if existing == run_dir else f'lies under the file {existing}'
    raise ValueError(f'--out {run_dir} {where}; a run needs a directory there. Choose another '
                     f'--out directory.')
  if resume:
    if not (run_dir / CONFIG).is_file():
      state = 'does not exist' if not run_dir.exists() else f'holds no {CONFIG}'
      raise ValueError(f'--resume: {run_dir} {state}, so there is no run to continue. Check the '
                       f'--out path, or drop --resume to start a new run there.')
    return
  found = [name for name in RUN_FILES if (run_dir / name).exists()]
  if found and not overwrite:
    raise ValueError(f'{run_dir} already holds a run ({", ".join(found)}). Pass --resume to '
                     f'continue it, --overwrite to replace it, or choose another --out '
                     f'directory.')


def read_run_config(run_dir: Path) -> dict:
  """A run's config.json, which must hold the `flags` it was made with."""
  path = Path(run_dir) / CONFIG
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is unreadable ({type(e).__name__}: {e}); it should be the '
                     f'config.json that ntkdd distill writes.') from None
  if not isinstance(config, dict) or not isinstance(config.get('flags'), dict):
    raise ValueError(f'{path} has no "flags" record, so it is not a config.json written by '
                     f'ntkdd distill. Point at the run directory ntkdd made.')
  return config


def check_same_data(run_dir: Path, dataset: dict) -> None:
  """--resume: refuses data whose name or content fingerprint (`Dataset.checksum`, not the
  path) differs from the one the run recorded in config.json."""
  saved = read_run_config(run_dir).get('dataset')
  path = Path(run_dir) / CONFIG
  if not isinstance(saved, dict) or 'checksum' not in saved:
    raise ValueError(f'--resume: {path} does not record the dataset the run used, so resuming '
                     f'cannot be checked. Start a new run (--overwrite or another --out).')
  for key in ('name', 'checksum'):
    if saved.get(key) != dataset.get(key):
      raise ValueError(f'--resume: the data differ from the run\'s: dataset {key} was '
                       f'{saved.get(key)!r} in {path}, now {dataset.get(key)!r}. Resume with the '
                       f'same data (--dataset and the files in --data-dir), or start a new '
                       f'--out directory.')


def open_run(run_dir: Path, flags: dict, resumable: tuple, resume: bool,
             dataset: Optional[dict] = None, overwrite: bool = False,
             arrays_needed: Sequence[str] = ()) -> Optional[tuple]:
  """Prepares `run_dir` for a run with `flags`; returns the checkpoint to resume from (or None).

  A fresh run refuses a directory that already holds one (`check_run_dir`) unless `overwrite`,
  which removes the old run's files; --resume refuses flags that differ from the run's
  config.json, except those in `resumable` (e.g. steps, eval cadence), data that differ from
  `dataset` ({'name', 'checksum'}, checked where given), and a run without a checkpoint.
  Everything is checked before the directory is made or changed.
  """
  run_dir = Path(run_dir)
  check_run_dir(run_dir, resume, overwrite)
  saved = None
  if resume:
    saved_flags = read_run_config(run_dir)['flags']
    for key, value in flags.items():
      if key in resumable or key not in saved_flags:
        continue
      if saved_flags[key] != value:
        raise ValueError(f'--resume: flag {key} was {saved_flags[key]!r} in this run directory, '
                         f'now {value!r}. Resume with the same flags, or start a new --out '
                         f'directory.')
    if dataset is not None:
      check_same_data(run_dir, dataset)
    saved = load_checkpoint(run_dir, arrays_needed)
    if saved is None:
      raise ValueError(f'--resume: {run_dir} has no {CHECKPOINT} to continue from. Start the run '
                       f'again with --overwrite, or into a new --out directory.')
  run_dir.mkdir(parents=True, exist_ok=True)
  if overwrite:
    remove_run_files(run_dir)
  return saved


def remove_run_files(run_dir: Path) -> None:
  """--overwrite: the files of the run in `run_dir` go (other files stay)."""
  for name in RUN_FILES:
    (Path(run_dir) / name).unlink(missing_ok=True)


def discard_failed_start(run_dir: Path, made_dir: bool, also: Sequence[str] = ()) -> None:
  """A fresh run that failed before its first checkpoint or result leaves nothing behind: its
  files (and the files named in `also`, e.g. its status snapshot) go, and the directory too
  where the run made it and it is empty now."""
  run_dir = Path(run_dir)
  if (run_dir / CHECKPOINT).exists() or (run_dir / SUMMARY).exists():
    return   # the run got somewhere: keep it (resume, or --overwrite)
  remove_run_files(run_dir)
  for name in also:
    (run_dir / name).unlink(missing_ok=True)
  if made_dir:
    try:
      run_dir.rmdir()
    except OSError:
      pass   # something else was put there meanwhile: keep it


def check_output_file(path: Path, flag: str, example: str) -> None:
  """An output file's path must name a file in an existing folder (checked before the work)."""
  path = Path(path)
  if path.is_dir():
    raise ValueError(f'{flag} {path} is a directory; give a file name, e.g. {path / example}.')
  existing = next((p for p in path.parents if p.exists()), None)
  if existing is not None and not existing.is_dir():
    raise ValueError(f'{flag} {path} lies under {existing}, which is a file; choose another '
                     f'path.')
  if not path.parent.exists():
    raise ValueError(f'{flag} {path}: the folder {path.parent} does not exist; create it first, '
                     f'or choose another path.')


def _check_array_file(path: Path, what: str, magic: bytes, kind: str) -> Path:
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{what} {path} does not exist; check the path.')
  if path.is_dir():
    hint = (f' (e.g. {path / SUPPORT})' if (path / SUPPORT).exists() else '')
    raise ValueError(f'{what} {path} is a directory; give the {kind} file itself{hint}.')
  with open(path, 'rb') as f:
    head = f.read(len(_NPY_MAGIC))
  if not head.startswith(magic):
    found = ('a .npy file (one array)' if head.startswith(_NPY_MAGIC) else
             'an .npz archive' if head.startswith(_NPZ_MAGIC) else 'not a numpy file')
    save = 'numpy.savez(path, name=array, ...)' if kind == '.npz' else 'numpy.save(path, array)'
    raise ValueError(f'{what} {path} is {found}, not a {kind} file; write it with {save}.')
  return path


def load_npz_file(path: Path, what: str = 'file') -> dict[str, np.ndarray]:
  """The arrays of an .npz, with one clear error for a missing, damaged or non-npz file, or one
  holding object (pickled) arrays."""
  path = _check_array_file(path, what, _NPZ_MAGIC, '.npz')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    if isinstance(e, ValueError) and 'pickle' in str(e):
      raise ValueError(f'{what} {path} holds object arrays (pickled Python data), which ntkdd '
                       f'does not load; save plain numeric arrays.') from None
    raise ValueError(f'{what} {path} is damaged or truncated ({type(e).__name__}: {e}); write '
                     f'it again.') from None


def load_npy_file(path: Path, what: str = 'file') -> np.ndarray:
  """The array of an .npy, with the same clear errors as `load_npz_file`."""
  path = _check_array_file(path, what, _NPY_MAGIC, '.npy')
  try:
    return np.load(path, allow_pickle=False)
  except ValueError as e:
    if 'pickle' not in str(e):
      raise ValueError(f'{what} {path} is damaged or truncated ({e}); write it again.') from None
    raise ValueError(f'{what} {path} holds an object array (pickled Python data), which ntkdd '
                     f'does not load; save a plain numeric array.') from None
  except (EOFError, OSError) as e:
    raise ValueError(f'{what} {path} is damaged or truncated ({type(e).__name__}: {e}); write '
                     f'it again.') from None
