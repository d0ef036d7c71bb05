"""Evaluation of a support set: KRR test accuracy and finite-width transfer, with baselines."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ntkdd.common import architectures, kip, preprocess
from ntkdd.server import backend as backend_lib
from ntkdd.server import checkpoint, distill
from ntkdd.server import run_dir as run_files


@dataclasses.dataclass(frozen=True)
class SupportSet:
  images: np.ndarray        # model space
  labels: np.ndarray        # (n, C) float
  label_ids: np.ndarray     # (n,) int


def read_support_file(path: str) -> dict[str, np.ndarray]:
  """The arrays of a support .npz, checked for what needs no dataset: a readable .npz holding
  images (or images_pixels) and labels (or label_ids), at least one image."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'--support {path} does not exist; `ntkdd distill --out DIR` writes '
                            f'DIR/{run_files.SUPPORT}.')
  arrays = checkpoint.load_npz_file(path, '--support')
  if 'images_pixels' not in arrays and 'images' not in arrays:
    raise ValueError(f'--support {path} has neither images nor images_pixels (found '
                     f'{sorted(arrays)}); a support set holds images and labels (or label_ids).')
  if 'labels' not in arrays and 'label_ids' not in arrays:
    raise ValueError(f'--support {path} has no labels or label_ids (found {sorted(arrays)}).')
  images = arrays.get('images', arrays.get('images_pixels'))
  if images.ndim < 1 or len(images) == 0:
    raise ValueError(f'--support {path} holds no images (shape {images.shape}); an empty support '
                     f'set has nothing to evaluate.')
  return arrays


def load_support(path: str, prepared: distill.PreparedData, pixels: bool = False,
                 arrays: Optional[dict] = None) -> SupportSet:
  """Reads a support .npz: `images` (model space) or `images_pixels` ([0,1] pixels, then
  preprocessed like the dataset), and `labels` (n, C) or `label_ids` (n,); or a checkpoint of
  the RCIG/FRePo code (`foreign_sets`). `arrays`: the .npz's arrays where `read_support_file`
  already read them."""
  path = Path(path)
  from ntkdd.server import foreign_sets  # pylint: disable=import-outside-toplevel
  if foreign_sets.is_flax_checkpoint(path):
    if pixels:
      raise ValueError(f'{path} is an RCIG/FRePo checkpoint: its x_proto is in that code\'s '
                       f'preprocessed space, not pixels; drop --pixels.')
    images, labels, label_ids, place = foreign_sets.load_flax_support(
        path, prepared.x_train.shape[1:], prepared.num_classes)
    logging.info('Support from %s (%s), in the %r preprocessed space.', path,
                 place or 'top level', prepared.preprocessor.kind)
    return SupportSet(images, labels, label_ids)
  arrays = read_support_file(path) if arrays is None else arrays
  if pixels or 'images' not in arrays:
    raw = arrays.get('images_pixels', arrays.get('images')).astype(np.float32)
    if raw.ndim == 3:
      raw = raw[..., None]
    images = prepared.preprocessor.apply(raw)
  else:
    images = arrays['images'].astype(np.float32)
  expected = prepared.x_train.shape[1:]
  if images.shape[1:] != expected:
    raise ValueError(f'Support images have shape {images.shape[1:]}, but {prepared.dataset.name} '
                     f'after preprocessing has {expected}; use the dataset (and --image-size) '
                     f'the support set was made for.')
  num_classes = prepared.num_classes
  if 'labels' in arrays:
    labels = arrays['labels'].astype(np.float32)
    if labels.shape != (len(images), num_classes):
      raise ValueError(f'labels have shape {labels.shape}, expected ({len(images)}, '
                       f'{num_classes}).')
    label_ids = arrays.get('label_ids', np.argmax(labels, -1)).astype(np.int32)
  else:
    label_ids = arrays['label_ids']
    if label_ids.shape != (len(images),) or not np.issubdtype(label_ids.dtype, np.integer):
      raise ValueError(f'{path}: label_ids must be {len(images)} integer class ids, one per '
                       f'image, got {label_ids.dtype} {label_ids.shape}.')
    if label_ids.min() < 0 or label_ids.max() >= num_classes:
      raise ValueError(f'{path}: label_ids span [{label_ids.min()}, {label_ids.max()}], outside '
                       f'the class ids 0..{num_classes - 1} of {prepared.dataset.name}.')
    label_ids = label_ids.astype(np.int32)
    labels = preprocess.one_hot_centered(label_ids, num_classes)
  if not np.all(np.isfinite(images)) or not np.all(np.isfinite(labels)):
    raise ValueError(f'{path} holds NaN or inf values.')
  return SupportSet(images, labels, label_ids)


@dataclasses.dataclass(frozen=True)
class TransferSettings:
  """How finite networks are trained on a support set."""
  networks: tuple = ('convnet', 'fc')
  width: int = 128
  steps: int = 1000
  seeds: int = 3
  augment: bool = False
  parameterization: str = 'ntk'
  learning_rate: Optional[float] = None   # None: 1e-3 (ntk) or 1e-4 (standard)


def transfer_accuracy(arch_name: str, support: SupportSet, prepared,
                      settings: TransferSettings, kernel_arch: Optional[architectures.Architecture]
                      = None) -> dict[str, Any]:
  from ntkdd.common import train
  # The finite net is the kernel's architecture when it is the same kind, else the default.
  depth = (kernel_arch.depth if kernel_arch is not None and kernel_arch.name == arch_name
           else 3 if arch_name == 'convnet' else 2)
  arch = architectures.Architecture(arch_name, depth=depth,
                                    width=settings.width,
                                    parameterization=settings.parameterization)
  learning_rate = settings.learning_rate
  if learning_rate is None:
    learning_rate = 1e-3 if settings.parameterization == 'ntk' else 1e-4
  steps, augment = settings.steps, settings.augment
  # RCIG's optimiser and schedule, but this evaluator's steps, augmentation and zero readout.
  config = dataclasses.replace(train.rcig_protocol(len(support.images), learning_rate),
                               steps=steps, warmup_steps=min(500, steps // 4), augment=augment,
                               schedule_steps=0, final_lr_fraction=0.0, warmup_from_zero=False,
                               zero_readout=True,
                               crop_padding=2 if prepared.x_train.shape[1] <= 28 else 4)
  result = train.evaluate_transfer(arch, support.images, support.labels, prepared.x_test,
                                   prepared.y_test, config, seeds=tuple(range(settings.seeds)),
                                   num_classes=prepared.num_classes)
  result['arch'] = arch.to_dict()
  result['train_config'] = config.to_dict()
  return result


def evaluate_support(support: SupportSet, prepared, cfg: distill.DistillConfig,
                     settings: TransferSettings) -> dict[str, Any]:
  backend = backend_lib.InProcessKernels(cfg.architecture(), tile=cfg.tile, dtype=cfg.dtype)
  start = time.time()
  out: dict[str, Any] = {'krr': {
      'test_accuracy': kip.krr_accuracy(backend, support.images, support.labels,
                                        prepared.x_test, prepared.y_test, cfg.kernel, cfg.reg),
      'kernel': cfg.architecture().to_dict(), 'which': cfg.kernel, 'reg': cfg.reg,
      'test_size': int(len(prepared.x_test))}}
  out['transfer'] = {name: transfer_accuracy(name, support, prepared, settings,
                                             cfg.architecture())
                     for name in settings.networks}
  out['seconds'] = time.time() - start
  return out


DATA_KEYS = ('dataset', 'preprocess', 'zca_strength', 'image_size')
KERNEL_KEYS = ('arch', 'depth', 'w_std', 'b_std', 'kernel', 'reg')


def _run_config(args) -> Optional[tuple[Path, dict]]:
  """(path, contents) of the run's config.json: --run's, else beside the support file."""
  run_dir = Path(args.run) if args.run else Path(args.support).parent
  config_path = run_dir / run_files.CONFIG
  if not config_path.exists():
    if args.run:
      raise ValueError(f'--run {run_dir} holds no {run_files.CONFIG}; give the directory of an '
                       f'ntkdd distill run, or leave --run out and give --dataset etc.')
    return None
  return config_path, checkpoint.read_run_config(run_dir)


def _config_for(args, run_config: Optional[tuple[Path, dict]] = None) -> distill.DistillConfig:
  """Data and kernel settings: the run's config.json where there is one, else the flags. An
  RCIG run records its data but no kernel: the kernel flags apply."""
  fields = dict(dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                download=args.download, arch=args.arch, depth=args.depth, w_std=args.w_std,
                b_std=args.b_std, kernel=args.kernel, reg=args.reg, dtype=args.dtype,
                tile=args.tile, preprocess=args.preprocess, zca_strength=args.zca_strength,
                image_size=args.image_size)
  if run_config is not None:
    config_path, config = run_config
    saved = config['flags']
    if 'dataset' not in saved:   # an RCIG run from before runs recorded their data flags
      logging.warning('%s does not say how the run loaded its data: using --dataset, --data-dir '
                      'and --image-size as given (the data\'s checksum is checked).', config_path)
      recorded = config.get('dataset') or {}
      if recorded.get('preprocess'):
        fields['preprocess'] = recorded['preprocess']
    keys = DATA_KEYS + (KERNEL_KEYS if saved.get('algorithm') != 'rcig' else ())
    fields.update({key: saved[key] for key in keys if key in saved})
    if args.data_dir is None and saved.get('data_dir'):
      fields['data_dir'] = saved['data_dir']
    if args.cache_dir is None and saved.get('cache_dir'):
      fields['cache_dir'] = saved['cache_dir']
    logging.info('Dataset and preprocessing%s from %s.',
                 '' if saved.get('algorithm') == 'rcig' else ' and kernel', config_path)
  if fields['data_dir'] is None:
    fields['data_dir'] = 'data'
  return distill.DistillConfig(**fields)


def evaluate_from_args(args) -> dict[str, Any]:
  from ntkdd.server import foreign_sets  # pylint: disable=import-outside-toplevel
  foreign = foreign_sets.is_flax_checkpoint(args.support)
  if foreign and args.preprocess == 'auto':
    raise ValueError(f'{args.support} is an RCIG/FRePo checkpoint, made in that code\'s '
                     f'preprocessed space: name that preprocessing with --preprocess (the '
                     f'test split gets the same).')
  transfer = tuple(t for t in args.transfer.split(',') if t)
  for name in transfer:
    if name not in architectures.ARCHITECTURES:
      raise ValueError(f'--transfer: unknown network {name!r}; choose from '
                       f'{architectures.ARCHITECTURES}.')
  # Before the (slow) dataset load.
  arrays = None if foreign else read_support_file(args.support)
  out = Path(args.out) if args.out else Path(args.support).parent / run_files.EVALUATION
  checkpoint.check_output_file(out, '--out', run_files.EVALUATION)
  run_config = _run_config(args)
  cfg = _config_for(args, run_config)
  cfg.validate()
  prepared = distill.prepare_data(cfg)
  if run_config is not None:
    recorded = run_config[1].get('dataset') or {}
    if recorded.get('checksum') not in (None, prepared.dataset.checksum()):
      raise ValueError(f'The data loaded from --data-dir {cfg.data_dir} differ from those the run '
                       f'in {run_config[0].parent} was made with (dataset checksum); give the '
                       f'--data-dir holding the same files.')
  architectures.check_input_shape(cfg.architecture(), prepared.x_train.shape[1:])
  support = load_support(args.support, prepared, pixels=args.pixels, arrays=arrays)
  settings = TransferSettings(networks=transfer, width=args.width, steps=args.train_steps,
                              seeds=args.seeds, augment=args.augment,
                              parameterization=args.parameterization,
                              learning_rate=args.train_lr)
  report = {'support': str(args.support), 'dataset': prepared.dataset.name,
            'images': int(len(support.images)),
            'distilled': evaluate_support(support, prepared, cfg, settings)}
  if args.baselines:
    ipc = max(1, len(support.images) // prepared.num_classes)
    idx = preprocess.class_balanced_indices(prepared.y_train, ipc, np.random.default_rng(0),
                                            num_classes=prepared.num_classes)
    real = SupportSet(prepared.x_train[idx], preprocess.one_hot_centered(
        prepared.y_train[idx], prepared.num_classes), prepared.y_train[idx])
    report['random_real'] = evaluate_support(real, prepared, cfg, settings)
  run_files.write_json(out, report)
  report['written_to'] = str(out)
  return report


def format_report(report: dict[str, Any]) -> str:
  rows = [('set', 'KRR test acc', *[f'{k} (mean ± std)' for k in
                                    report['distilled']['transfer']])]
  for name in ('distilled', 'random_real'):
    if name not in report:
      continue
    r = report[name]
    rows.append((name, f"{100 * r['krr']['test_accuracy']:.2f}%",
                 *[f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f}%"
                   for t in r['transfer'].values()]))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = [f"{report['dataset']}: {report['images']} support images ({report['support']})"]
  lines += ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.append(f"written to {report['written_to']}")
  return '\n'.join(lines)
