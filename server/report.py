"""What `ntkdd show` and `ntkdd export` do with a run directory: its pictures, its text summary
and its distilled set for other tools (the pictures themselves: server/pictures.py)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ntkdd.server import run_dir as run_files
from ntkdd.server.checkpoint import checkpoint_step
from ntkdd.server.pictures import (class_names_for, import_pillow, is_number, metric_series,
                                   save_png, to_uint8_nhwc, write_curves, write_support_grid)
from ntkdd.server.progress import format_duration
from ntkdd.server.run_dir import (CHECKPOINT, CONFIG, CURVES_PNG, EVALUATION, METRICS, SUMMARY,
                                  SUPPORT, SUPPORT_PNG, PathLike, read_json_object,
                                  read_optional_json_object)

MAKE_RUN_HINT = '`ntkdd distill --out DIR` makes one'
_LOG = logging.getLogger(__name__)


class NotARunDirectoryError(FileNotFoundError):
  """The folder is missing, or lacks a file every run directory has."""


def _require_run_dir(run_dir: PathLike) -> Path:
  run_dir = Path(run_dir)
  if not run_dir.exists():
    raise NotARunDirectoryError(f'{run_dir} does not exist. A run directory holds {CONFIG}, '
                                f'{METRICS} and {SUPPORT}; {MAKE_RUN_HINT}.')
  if not run_dir.is_dir():
    raise NotARunDirectoryError(f'{run_dir} is a file, not a run directory; {MAKE_RUN_HINT}.')
  if not (run_dir / CONFIG).exists():
    raise NotARunDirectoryError(f'{run_dir} is not a run directory: {CONFIG} is missing. '
                                f'{MAKE_RUN_HINT[0].upper()}{MAKE_RUN_HINT[1:]}.')
  return run_dir


# -- rendering a run ------------------------------------------------------------------------

def _load_support(path: Path, config: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(images in [0, 1], label ids, class names) from support.npz, however complete."""
  with np.load(path, allow_pickle=False) as support:
    if 'images_pixels' in support.files:
      pixels = support['images_pixels']
    else:  # older files: stretch the preprocessed images to [0, 1] for display
      _LOG.warning('%s has no images_pixels; showing rescaled preprocessed images.', path)
      images = support['images'].astype(np.float32)
      pixels = (images - images.min()) / max(float(np.ptp(images)), 1e-12)
    label_ids = (support['label_ids'] if 'label_ids' in support.files
                 else np.argmax(support['labels'], axis=-1))
    names = (support['class_names'].tolist() if 'class_names' in support.files
             else config.get('dataset', {}).get('class_names'))
  return pixels, np.asarray(label_ids), [str(n) for n in (names or [])]


def _run_title(config: dict) -> str:
  flags = config.get('flags', {})
  dataset = config.get('dataset', {}).get('name', flags.get('dataset', '?'))
  algorithm = str(flags.get('algorithm', '?')).upper()
  ipc = flags.get('ipc', '?')
  return f'{algorithm} on {dataset}, {ipc} image{"" if ipc == 1 else "s"} per class'


def render_run(run_dir: PathLike) -> list[Path]:
  """(Re)writes support.png and curves.png from the run's files; returns the paths written."""
  run_dir = _require_run_dir(run_dir)
  config = read_json_object(run_dir / CONFIG)
  written = []
  if (run_dir / SUPPORT).exists():
    pixels, label_ids, names = _load_support(run_dir / SUPPORT, config)
    written.append(write_support_grid(run_dir / SUPPORT_PNG, pixels, label_ids, names))
  else:
    _LOG.info('%s has no %s yet; support.png not written.', run_dir, SUPPORT)
  if (run_dir / METRICS).exists():
    records = run_files.read_metrics(run_dir, warn=True)
    written.append(write_curves(run_dir / CURVES_PNG, records, _run_title(config)))
  else:
    _LOG.info('%s has no %s yet; curves.png not written.', run_dir, METRICS)
  return written


# -- export ---------------------------------------------------------------------------------

EXPORT_FORMATS = ('folders', 'npz')
LABELS_CSV = 'labels.csv'


def _folder_name(class_id: int, name: str, width: int) -> str:
  """`07_horse`: the id first (zero-padded, so sorting the folders keeps the class order, as
  torchvision's ImageFolder does), then the name made safe for a path."""
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name).strip('.') or 'class'
  return f'{class_id:0{width}d}_{safe}'


def export_support(run_dir: PathLike, out: PathLike, fmt: str = 'folders') -> Path:
  """Writes a run's distilled set for other tools; returns what was written.

  `folders`: `out/<id>_<class>/<n>.png` (the images in [0, 1] as 8-bit PNG, grayscale or RGB)
  and `out/labels.csv` (file, label_id, class_name and the label vector, learned or one-hot
  minus 1/C, one column per class). `npz`: `out` (a .npz) with the keys of support.npz.
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}: choose one of {", ".join(EXPORT_FORMATS)}.')
  run_dir = _require_run_dir(run_dir)
  if not (run_dir / SUPPORT).exists():
    raise NotARunDirectoryError(f'{run_dir} has no {SUPPORT} yet: nothing to export.')
  out = Path(out)
  config = read_json_object(run_dir / CONFIG)
  with np.load(run_dir / SUPPORT, allow_pickle=False) as support:
    arrays = {key: support[key] for key in support.files}
  if fmt == 'npz':
    if out.suffix != '.npz':
      raise ValueError(f'--out {out}: the npz format writes one file; name it *.npz.')
    out.parent.mkdir(parents=True, exist_ok=True)
    run_files.save_npz(out, arrays)
    return out
  Image, _, _ = import_pillow()
  pixels, label_ids, names = _load_support(run_dir / SUPPORT, config)
  labels = arrays.get('labels')
  names = class_names_for(np.asarray(label_ids), names)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f'--out {out} is not empty: export into a new folder.')
  out.mkdir(parents=True, exist_ok=True)
  images = to_uint8_nhwc(pixels)
  width = len(str(max(len(names) - 1, 0)))
  rows = ['file,label_id,class_name' + ''.join(f',label_{k}' for k in range(
      labels.shape[1] if labels is not None else 0))]
  counts: dict[int, int] = {}
  for image, class_id in zip(images, np.asarray(label_ids, dtype=np.int64)):
    folder = out / _folder_name(int(class_id), names[class_id], width)
    folder.mkdir(exist_ok=True)
    index = counts.get(int(class_id), 0)
    counts[int(class_id)] = index + 1
    path = folder / f'{index:04d}.png'
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    save_png(picture, path)
    row = [str(path.relative_to(out)), str(int(class_id)),
           '"' + names[class_id].replace('"', '""') + '"']
    if labels is not None:
      row += [repr(float(v)) for v in labels[len(rows) - 1]]
    rows.append(','.join(row))
  run_files.atomic_write_bytes(out / LABELS_CSV, ('\n'.join(rows) + '\n').encode())
  return out


# -- text summary ---------------------------------------------------------------------------

def _is_accuracy_key(key: str) -> bool:
  """Accuracies (fractions) print as percent: *accuracy* keys, and the transfer results."""
  return 'accurac' in key or (key.startswith('transfer.') and key.rsplit('.', 1)[-1] in (
      'mean', 'std', 'min', 'max'))


def _format_value(key: str, value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    if _is_accuracy_key(key) and 0.0 <= value <= 1.0:
      return f'{100 * value:.2f}%'
    return f'{value:.4g}'
  if isinstance(value, (list, tuple)):
    shown = ', '.join(_format_value(key, v) for v in value[:8])
    return f'[{shown}{", ..." if len(value) > 8 else ""}] ({len(value)} values)'
  return str(value)


def _flatten(mapping: dict, prefix: str = '') -> list[tuple[str, Any]]:
  rows = []
  for key, value in mapping.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      rows.extend(_flatten(value, f'{name}.'))
    else:
      rows.append((name, value))
  return rows


def format_table(mapping: dict, indent: str = '  ') -> str:
  """Nested keys dotted, one per line, values aligned."""
  rows = [(key, _format_value(key, value)) for key, value in _flatten(mapping)]
  if not rows:
    return f'{indent}(empty)'
  width = max(len(key) for key, _ in rows)
  return '\n'.join(f'{indent}{key.ljust(width)}  {value}' for key, value in rows)


def _format_bytes(size: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if size < 1024 or unit == 'GB':
      return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
    size /= 1024
  return f'{size} B'


def _dataset_line(config: dict) -> str:
  dataset = config.get('dataset', {})
  parts = [str(dataset.get('name', config.get('flags', {}).get('dataset', '?')))]
  if dataset.get('image_shape'):
    parts.append('x'.join(str(d) for d in dataset['image_shape']))
  if dataset.get('num_classes') is not None:
    parts.append(f'{dataset["num_classes"]} classes')
  if dataset.get('checksum'):
    parts.append(f'checksum {str(dataset["checksum"])[:12]}')
  return ', '.join(parts)


def _algorithm_line(flags: dict) -> str:
  keys = [('ipc', 'ipc'), ('steps', 'steps'), ('kernel', 'kernel'), ('arch', 'arch'),
          ('depth', 'depth'), ('learning_rate', 'lr'), ('reg', 'reg'),
          ('learn_labels', 'learn_labels'), ('target_batch', 'target_batch'), ('seed', 'seed')]
  parts = [str(flags.get('algorithm', '?')).upper()]
  parts += [f'{short}={_format_value(short, flags[key])}' for key, short in keys if key in flags]
  return '  '.join(parts)


def _progress_lines(records: list[dict], flags: dict, summary: Optional[dict]) -> list[str]:
  steps_done = max([int(r['step']) for r in records if is_number(r.get('step'))], default=0)
  if summary and is_number(summary.get('steps')):
    steps_done = max(steps_done, int(summary['steps']))
  requested = flags.get('steps')
  if str(flags.get('algorithm')).lower() == 'ls':
    lines = ['Steps:         Label Solve (one solve, no steps)']
  elif is_number(requested) and requested > 0:
    lines = [f'Steps:         {steps_done} / {requested} ({100 * steps_done / requested:.0f}%)'
             + ('' if steps_done >= requested else ', unfinished (a stopped run goes on with '
                                                   '--resume)')]
  else:
    lines = [f'Steps:         {steps_done}']
  loss_steps, losses = metric_series(records, 'loss')
  if len(loss_steps):
    lines.append(f'Last loss:     {losses[-1]:.4g} (step {loss_steps[-1]})')
  acc_steps, accuracies = metric_series(records, 'krr_test_accuracy')
  if len(acc_steps):
    best = int(np.argmax(accuracies))
    lines.append(f'KRR test acc:  best {100 * accuracies[best]:.2f}% (step {acc_steps[best]}), '
                 f'last {100 * accuracies[-1]:.2f}% (step {acc_steps[-1]})'
                 + (f', initial {100 * accuracies[0]:.2f}% (step {acc_steps[0]})'
                    if len(acc_steps) > 1 else ''))
  _, wall_times = metric_series(records, 'wall_time')
  if len(wall_times):
    lines.append(f'Wall time:     {format_duration(float(wall_times.max()))}')
  return lines


def _file_lines(run_dir: Path) -> list[str]:
  lines = []
  checkpoint_path = run_dir / CHECKPOINT
  if checkpoint_path.exists():
    stat = checkpoint_path.stat()
    step = checkpoint_step(checkpoint_path)
    details = ([f'step {step}'] if step is not None else []) + [
        _format_bytes(stat.st_size), f'saved {format_duration(time.time() - stat.st_mtime)} ago']
    lines.append(f'Checkpoint:    {checkpoint_path} ({", ".join(details)})')
  else:
    lines.append('Checkpoint:    none')
  pictures = [run_dir / name for name in (SUPPORT_PNG, CURVES_PNG)]
  present = [str(p) for p in pictures if p.exists()]
  lines.append('Pictures:      ' + (', '.join(present) if present else 'none yet')
               + ('' if len(present) == len(pictures) else
                  '  (written when a run ends, and by `ntkdd show`)'))
  return lines


def summarize_run(run_dir: PathLike) -> str:
  """The text of `ntkdd show RUN_DIR`: what ran, how far, how well, and where its files are."""
  run_dir = _require_run_dir(run_dir)
  config = read_json_object(run_dir / CONFIG)
  flags = config.get('flags', {})
  summary = read_optional_json_object(run_dir / SUMMARY)
  evaluation = read_optional_json_object(run_dir / EVALUATION)
  records = run_files.read_metrics(run_dir, warn=True) if (run_dir / METRICS).exists() else []
  lines = [f'Run directory: {run_dir}',
           f'Dataset:       {_dataset_line(config)}',
           f'Algorithm:     {_algorithm_line(flags)}']
  if config.get('created'):
    lines.append(f'Created:       {config["created"]}')
  if records:
    lines += _progress_lines(records, flags, summary)
  else:
    lines.append(f'Steps:         none recorded yet ({METRICS} is missing or empty)')
  if summary is not None:
    lines += [f'Summary ({SUMMARY}):', format_table(summary)]
  if evaluation is not None:
    lines += [f'Evaluation ({EVALUATION}):', format_table(evaluation)]
  lines += _file_lines(run_dir)
  return '\n'.join(lines)
