"""The data side of a KIP, LS or RCIG run: fit checks, dataset record, support set, KRR accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ntkdd.common import kip, preprocess
from ntkdd.common import prepared as prepared_lib
from ntkdd.server import checkpoint, foreign_sets
from ntkdd.server import run_dir as run_files

PreparedData = prepared_lib.PreparedData

# support.npz's key for the log temperature of the loss a set was made with (RCIG's outer loss,
# KIP's Platt loss) at the saved step, so that a run started from the set (--init-support)
# goes on at that temperature.
SUPPORT_LOG_TEMP = 'log_temp'


def check_batch_fits(prepared: PreparedData, size: int, flag: str) -> None:
  """A class-balanced draw of `size` train images (each class size // C, the remainder one more
  each) must fit every class; refuses with the largest size that does.

  Args:
    prepared: the run's data.
    size: the images drawn per batch.
    flag: the flag that sets `size`, for the message ('--target-batch').
  """
  counts = np.bincount(prepared.y_train, minlength=prepared.num_classes)
  classes = len(counts)
  need = size // classes + (1 if size % classes else 0)
  smallest = int(counts.min())
  if need > smallest:
    raise ValueError(f'{flag} {size} draws up to {need} images of each class, but class '
                     f'{int(counts.argmin())} of {prepared.dataset.name} has {smallest} training '
                     f'images: use {flag} {classes * smallest} or less.')


def check_ipc_fits(prepared: PreparedData, ipc: int) -> None:
  """ipc real images of every class must exist (the support starts from them)."""
  counts = np.bincount(prepared.y_train, minlength=prepared.num_classes)
  if not counts.all():
    empty = np.flatnonzero(counts == 0).tolist()
    raise ValueError(f'{prepared.dataset.name}: classes {empty} of {prepared.num_classes} have no '
                     f'training images (the labels skip those ids), so no support set can hold '
                     f'every class. Relabel the classes consecutively from 0, or drop the empty '
                     f'ones from class_names.')
  if ipc > counts.min():
    raise ValueError(f'--ipc {ipc} exceeds the smallest class of {prepared.dataset.name} '
                     f'(class {int(counts.argmin())}: {int(counts.min())} training images); use '
                     f'--ipc {int(counts.min())} or less.')


def dataset_record(prepared: PreparedData) -> dict:
  """What config.json records of the data: resume compares its name and checksum."""
  return {'name': prepared.dataset.name, 'checksum': prepared.dataset.checksum(),
          'image_shape': list(prepared.x_train.shape[1:]), 'num_classes': prepared.num_classes,
          'class_names': list(prepared.dataset.class_names),
          'preprocess': prepared.preprocessor.kind}


def initial_support(prepared: PreparedData, ipc: int, init: str, rng: np.random.Generator,
                    init_support: str = ''):
  """The support set a run starts from: class-balanced real train images, noise, or a set
  read from a file (`init_support`).

  Args:
    prepared: the run's data (model space).
    ipc: images per class.
    init: 'real' (train images) or 'noise' (Gaussian, scaled as the train images).
    rng: the run's generator (draws the images; not used with `init_support`).
    init_support: '' or the path of a support set to start from (--init-support:
      `load_start_support`); `init` is then not used.

  Returns:
    (images float32, labels float32 (centred one-hot unless the file's were learned), class
    ids).
  """
  if init_support:
    return load_start_support(init_support, prepared, ipc)
  idx = preprocess.class_balanced_indices(prepared.y_train, ipc, rng,
                                          num_classes=prepared.num_classes)
  label_ids = prepared.y_train[idx]
  if init == 'real':
    images = prepared.x_train[idx].astype(np.float32)
  else:
    scale = float(np.std(prepared.x_train[:1000]))
    images = (rng.normal(size=(len(idx),) + prepared.x_train.shape[1:]) * scale).astype(np.float32)
  labels = preprocess.one_hot_centered(label_ids, prepared.num_classes)
  return images, labels, label_ids


def check_start_support_exists(path: str) -> None:
  """--init-support must name a file or checkpoint folder (checked before the data load)."""
  if not Path(path).exists():
    raise ValueError(f'--init-support {path} does not exist; give the support.npz of a run '
                     f'(`ntkdd distill --out DIR` writes DIR/{run_files.SUPPORT}) or an '
                     f'RCIG/FRePo checkpoint.')


def load_start_support(path: str, prepared: PreparedData, ipc: int):
  """A support set to start a run from (--init-support): a support.npz of `ntkdd distill`, in
  this run's model space (same dataset, --image-size and --preprocess), or an RCIG/FRePo
  checkpoint (`foreign_sets`); it must hold `ipc` images of every class.

  Returns:
    (images float32, labels float32, class ids int32), as `initial_support`.
  """
  from ntkdd.server import evaluate  # pylint: disable=import-outside-toplevel
  check_start_support_exists(path)
  support = evaluate.load_support(path, prepared)
  counts = np.bincount(support.label_ids, minlength=prepared.num_classes)
  if len(counts) != prepared.num_classes or not np.all(counts == ipc):
    raise ValueError(f'--init-support {path} holds {len(support.label_ids)} images with '
                     f'{counts.tolist()} per class, but --ipc {ipc} starts from {ipc} of each '
                     f'of the {prepared.num_classes} classes: pass the --ipc the set was made '
                     f'with, or another set.')
  return (support.images.astype(np.float32), support.labels.astype(np.float32),
          support.label_ids.astype(np.int32))


def write_support(run_dir: Path, prepared: PreparedData, images, labels, label_ids,
                  scalars: Optional[dict] = None) -> None:
  """support.npz: the images (model space and pixels), labels, class ids and class names, and
  the algorithm's `scalars` that a run started from the set needs (its loss's temperature:
  SUPPORT_LOG_TEMP)."""
  arrays = {
      'images': np.asarray(images, np.float32),
      'images_pixels': prepared.preprocessor.inverse(images).astype(np.float32),
      'labels': np.asarray(labels, np.float32),
      'label_ids': np.asarray(label_ids, np.int32),
      'class_names': np.asarray(prepared.dataset.class_names),
  }
  arrays.update({name: np.float32(value) for name, value in (scalars or {}).items()})
  run_files.save_npz(run_dir / run_files.SUPPORT, arrays)


def saved_log_temp(path: str) -> Optional[float]:
  """The log temperature saved with the support set at `path` (the support.npz of an RCIG or KIP
  --loss platt run since it is recorded), or None (older sets, other losses, LS sets,
  RCIG/FRePo checkpoints; no --init-support: ''). Files are told apart and read as
  `evaluate.load_support` reads the set itself, whatever their names end in."""
  if not path or foreign_sets.is_flax_checkpoint(path):
    return None
  saved = checkpoint.load_npz_file(Path(path), '--init-support')
  if SUPPORT_LOG_TEMP not in saved:
    return None
  value = float(saved[SUPPORT_LOG_TEMP])
  if not np.isfinite(value):
    raise ValueError(f'--init-support {path}: its {SUPPORT_LOG_TEMP} is {value}, not a '
                     f'temperature to start from; remove that key from the file (a start at 0), '
                     f'or for RCIG give --rcig-init-log-temp.')
  return value


def evaluated_test_size(prepared: PreparedData, test_size: int) -> int:
  """How many test images an evaluation asked for `test_size` of them uses: the whole split
  for 0 or more than the split."""
  total = len(prepared.y_test)
  return total if not test_size or test_size >= total else int(test_size)


def fixed_test_rows(prepared: PreparedData, test_size: int, seed: int) -> Optional[np.ndarray]:
  """The sorted test rows every evaluation of a run uses (the same each time, so accuracies
  compare across steps), drawn from `seed`; None for the whole split (`test_size` 0 or more
  than the split)."""
  total = len(prepared.y_test)
  size = evaluated_test_size(prepared, test_size)
  if size == total:
    return None
  return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


def krr_test_accuracy(backend, prepared: PreparedData, images, labels, kernel: str, reg: float,
                      test_size: int, seed: int) -> float:
  """KRR test accuracy of the support set (images, labels) with `backend`'s `kernel`.

  Args:
    backend: a kernel backend (in-process or distributed).
    prepared: the run's data; the test images go as rows of its test split, so distributed
      workers holding the split get indices.
    images, labels: the support set (model space; label vectors).
    kernel: 'ntk' or 'nngp'. reg: the ridge lambda.
    test_size, seed: the fixed test subset (`fixed_test_rows`).

  Returns:
    The fraction of test images classified correctly.
  """
  return krr_test_accuracies(backend, prepared, images, [labels], kernel, reg, test_size,
                             seed)[0]


def krr_test_accuracies(backend, prepared: PreparedData, images, label_sets, kernel: str,
                        reg: float, test_size: int, seed: int) -> list[float]:
  """`krr_test_accuracy` for several label sets of the same images, the kernels computed once."""
  pick = fixed_test_rows(prepared, test_size, seed)
  x_test = prepared.rows('test') if pick is None else prepared.rows('test', pick)
  y_test = prepared.y_test if pick is None else prepared.y_test[pick]
  return kip.krr_accuracies(backend, images, label_sets, x_test, y_test, kernel, reg)
