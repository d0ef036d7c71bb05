"""Evaluation of a support set: KRR test accuracy and finite-width transfer, with baselines."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ntkdd.common import architectures, kip, preprocess
from ntkdd.common.choices import EVAL_PROTOCOLS
from ntkdd.server import backend as backend_lib
from ntkdd.server import checkpoint, distill
from ntkdd.server import run_dir as run_files

if TYPE_CHECKING:
  from ntkdd.common import train


@dataclasses.dataclass(frozen=True)
class SupportSet:
  images: np.ndarray        # model space
  labels: np.ndarray        # (n, C) float
  label_ids: np.ndarray     # (n,) int
  # Distilled with its left-right mirror images as part of the model (RCIG's flip_support):
  # finite networks train on both copies, as RCIG's evaluation does; KRR uses the set as it is.
  mirrored: bool = False


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


NTKDD_STEPS = 1000   # the 'ntkdd' protocol's steps per network when none are given


@dataclasses.dataclass(frozen=True)
class TransferSettings:
  """How finite networks are trained on a support set.

  protocol: one of choices.EVAL_PROTOCOLS. 'ntkdd': this evaluator's own (RCIG's Adam and
    cosine, but `steps` steps with a warm-up of min(500, steps // 4), a zero readout, and
    flips and crops with `augment`); 'kip' or 'rcig': the paper's (`train.paper_protocol`).
  steps: None: NTKDD_STEPS ('ntkdd') or the paper's; with a paper's protocol a number rescales
    it (`train.with_steps`), an explicit shortening.
  parameterization: None: 'ntk' ('ntkdd') or 'standard' (as both papers train).
  learning_rate: Adam's peak ('ntkdd', 'rcig'); None: `train.adam_learning_rate`. KIP's
    comes from each network's empirical NTK, so it must be None there.
  augment: 'ntkdd': random flips and crops; 'rcig': RCIG's augmentation (one op per image,
    `augment.default_strategy`) and its code's shorter loop; 'kip': none, so it must be False.
  """
  networks: tuple = ('convnet', 'fc')
  width: int = 128
  steps: Optional[int] = None
  seeds: int = 3
  augment: bool = False
  parameterization: Optional[str] = None
  learning_rate: Optional[float] = None
  protocol: str = 'ntkdd'

  def __post_init__(self):
    if self.protocol not in EVAL_PROTOCOLS:
      raise ValueError(f'Unknown protocol {self.protocol!r}: choose one of {EVAL_PROTOCOLS}.')
    if self.protocol == 'kip' and (self.learning_rate is not None or self.augment):
      raise ValueError("KIP's protocol sets each network's learning rate from its empirical NTK "
                       'and trains without augmentation: leave learning_rate and augment unset.')

  def resolved_parameterization(self) -> str:
    """The parameterisation the networks are trained in."""
    if self.parameterization is not None:
      return self.parameterization
    return 'ntk' if self.protocol == 'ntkdd' else 'standard'


def transfer_config(settings: TransferSettings, support_size: int,
                    image_shape: tuple) -> train.TrainConfig:
  """The training configuration of `settings` for a support of `support_size` images.

  Args:
    settings: the transfer settings (their protocol, steps, learning rate, augmentation).
    support_size: images in the support set (RCIG's schedule depends on it).
    image_shape: one image's shape (H, W, C) in model space (crop padding, RCIG's ops).

  Returns:
    The `train.TrainConfig` each network is trained with.
  """
  from ntkdd.common import augment as augment_lib, train  # pylint: disable=import-outside-toplevel
  parameterization = settings.resolved_parameterization()
  if settings.protocol != 'ntkdd':
    augmentations = augment_lib.default_strategy(image_shape[-1]) if settings.augment else ''
    config = train.paper_protocol(settings.protocol, support_size, parameterization,
                                  settings.learning_rate, augmentations)
    return config if settings.steps is None else train.with_steps(config, settings.steps)
  learning_rate = settings.learning_rate
  if learning_rate is None:
    learning_rate = train.adam_learning_rate(parameterization)
  steps = NTKDD_STEPS if settings.steps is None else settings.steps
  # RCIG's optimiser and schedule, but this evaluator's steps, augmentation and zero readout.
  return dataclasses.replace(train.rcig_protocol(support_size, learning_rate),
                             steps=steps, warmup_steps=min(500, steps // 4),
                             augment=settings.augment, schedule_steps=0, final_lr_fraction=0.0,
                             warmup_from_zero=False, zero_readout=True,
                             crop_padding=2 if image_shape[0] <= 28 else 4)


def transfer_architecture(arch_name: str, settings: TransferSettings,
                          kernel_arch: Optional[architectures.Architecture] = None
                          ) -> architectures.Architecture:
  """The finite network `arch_name` at `settings.width`.

  The kernel's architecture when it is the same kind: its depth ('ntkdd'), and also its
  initialisation under a paper's protocol (KIP trains the kernel's net at finite width).
  Otherwise the default depth (3 for convnet, else 2), and under a paper's protocol RCIG's own
  ConvNet ('rcig_convnet') at its paper's depth and initialisation (`rcig.RcigConfig`).

  Args:
    arch_name: one of architectures.ARCHITECTURES.
    settings: the transfer settings (width, parameterisation, protocol).
    kernel_arch: the kernel's architecture, if any.

  Returns:
    The architecture to train.
  """
  parameterization = settings.resolved_parameterization()
  same_kind = kernel_arch is not None and kernel_arch.name == arch_name
  if settings.protocol != 'ntkdd':
    if same_kind:
      return dataclasses.replace(kernel_arch, width=settings.width,
                                 parameterization=parameterization)
    if arch_name == 'rcig_convnet':
      from ntkdd.common import rcig  # pylint: disable=import-outside-toplevel
      paper = rcig.RcigConfig()
      return architectures.Architecture(arch_name, depth=paper.depth, w_std=paper.w_std,
                                        b_std=paper.b_std, width=settings.width,
                                        parameterization=parameterization)
  depth = kernel_arch.depth if same_kind else 3 if arch_name == 'convnet' else 2
  return architectures.Architecture(arch_name, depth=depth, width=settings.width,
                                    parameterization=parameterization)


def _network_progress(arch_name: str, networks: int) -> Callable[[int, float], None]:
  """`train.evaluate_transfer`'s progress callback: a log line per trained network, with the
  time it took and the time the rest will take at that pace (the KIP protocol's networks take
  minutes each on a CPU)."""
  start = time.perf_counter()
  done = [0]

  def report(seed: int, test_accuracy: float) -> None:
    done[0] += 1
    elapsed = time.perf_counter() - start
    left = (networks - done[0]) * elapsed / done[0]
    logging.info('%s network %d/%d (seed %d): test accuracy %.2f%%; %.0f s so far, about '
                 '%.0f s to go.', arch_name, done[0], networks, seed, 100 * test_accuracy,
                 elapsed, left)

  return report


def transfer_accuracy(arch_name: str, support: SupportSet, prepared,
                      settings: TransferSettings, kernel_arch: Optional[architectures.Architecture]
                      = None) -> dict[str, Any]:
  """Test accuracy of `settings.seeds` networks `arch_name` trained on the support set.

  Args:
    arch_name: the finite network (one of architectures.ARCHITECTURES).
    support: the support set, in model space.
    prepared: the dataset (`distill.PreparedData`): its test split and class count.
    settings: how the networks are trained.
    kernel_arch: the kernel's architecture (`transfer_architecture`).

  Returns:
    `train.evaluate_transfer`'s dict plus `arch`, `protocol`, `train_config` (every field of
    the configuration used) and, under a paper's protocol, `paper_steps` (its unshortened
    steps).
  """
  from ntkdd.common import train  # pylint: disable=import-outside-toplevel
  arch = transfer_architecture(arch_name, settings, kernel_arch)
  image_shape = prepared.x_train.shape[1:]
  # RCIG's schedule follows the distilled set's size, counted before any mirror images.
  config = transfer_config(settings, len(support.images), image_shape)
  images, labels = support.images, support.labels
  if support.mirrored:
    from ntkdd.common import rcig  # pylint: disable=import-outside-toplevel
    images, labels = (np.asarray(a) for a in rcig.with_flips(images, labels))
  logging.info('Training %d %s network(s), %d %s steps each, on %d images%s.', settings.seeds,
               arch_name, config.steps, config.optimizer, len(images),
               ' (the set and its mirror images)' if support.mirrored else '')
  result = train.evaluate_transfer(arch, images, labels, prepared.x_test,
                                   prepared.y_test, config, seeds=tuple(range(settings.seeds)),
                                   num_classes=prepared.num_classes,
                                   progress=_network_progress(arch_name, settings.seeds))
  result['arch'] = arch.to_dict()
  result['protocol'] = settings.protocol
  result['train_config'] = config.to_dict()
  result['mirror_images'] = support.mirrored
  if settings.protocol != 'ntkdd':
    unshortened = dataclasses.replace(settings, steps=None)
    result['paper_steps'] = transfer_config(unshortened, len(support.images), image_shape).steps
  return result


def evaluate_support(support: SupportSet, prepared, cfg: distill.DistillConfig,
                     settings: TransferSettings,
                     kernel_backend: Optional[kip.KernelBackend]) -> dict[str, Any]:
  """KRR test accuracy of `support` computed by `kernel_backend` (None: no KRR; 'krr' is
  None) and its finite networks' test accuracies."""
  start = time.time()
  out: dict[str, Any] = {'krr': None if kernel_backend is None else {
      'test_accuracy': kip.krr_accuracy(kernel_backend, support.images, support.labels,
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


def _mirrored(args, run_config: Optional[tuple[Path, dict]]) -> bool:
  """Whether finite networks train on the set and its mirror images: --mirror on/off, or with
  auto what the run recorded (an RCIG run distilled with --rcig-flip records flip_support)."""
  if args.mirror != 'auto':
    return args.mirror == 'on'
  recorded = bool(run_config is not None and run_config[1]['flags'].get('flip_support'))
  if recorded:
    logging.info('%s records flip_support: the finite networks train on the set and its mirror '
                 'images, as RCIG evaluates such sets (--mirror off to train on the set alone).',
                 run_config[0])
  return recorded


def evaluate_from_args(
    args, kernel_backends: Optional[Callable[[architectures.Architecture], kip.KernelBackend]]
    = None) -> dict[str, Any]:
  """`ntkdd evaluate`: the support set (and with --baselines random real images) scored by
  KRR and by finite networks; writes evaluation.json.

  Args:
    args: the parsed `ntkdd evaluate` arguments.
    kernel_backends: `arch -> kernel backend` for the KRR accuracies (the launch's: in this
      process, or workers); None: the engine in this process (--tile, --dtype). Unused with
      --no-krr.

  Returns:
    The report written (plus 'written_to').
  """
  from ntkdd.server import foreign_sets  # pylint: disable=import-outside-toplevel
  foreign = foreign_sets.is_flax_checkpoint(args.support)
  if foreign and args.preprocess == 'auto':
    raise ValueError(f'{args.support} is an RCIG/FRePo checkpoint, made in that code\'s '
                     f'preprocessed space: name that preprocessing with --preprocess (the '
                     f'test split gets the same).')
  transfer = tuple(t for t in args.transfer.split(',') if t)
  krr = getattr(args, 'krr', True)
  if not krr and not transfer:
    raise ValueError('--no-krr with --transfer \'\' leaves nothing to evaluate: give finite '
                     'networks with --transfer, or drop --no-krr.')
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
  support = dataclasses.replace(support, mirrored=_mirrored(args, run_config))
  settings = TransferSettings(networks=transfer, width=args.width, steps=args.train_steps,
                              seeds=args.seeds, augment=args.augment,
                              parameterization=args.parameterization,
                              learning_rate=args.train_lr, protocol=args.protocol)
  kernel_backend: Optional[kip.KernelBackend] = None
  if krr:
    kernel_backend = (kernel_backends(cfg.architecture()) if kernel_backends is not None else
                      backend_lib.InProcessKernels(cfg.architecture(), tile=cfg.tile,
                                                   dtype=cfg.dtype))
  try:
    report = {'support': str(args.support), 'dataset': prepared.dataset.name,
              'images': int(len(support.images)), 'protocol': settings.protocol,
              'distilled': evaluate_support(support, prepared, cfg, settings, kernel_backend)}
    if args.baselines:
      ipc = max(1, len(support.images) // prepared.num_classes)
      idx = preprocess.class_balanced_indices(prepared.y_train, ipc, np.random.default_rng(0),
                                              num_classes=prepared.num_classes)
      real = SupportSet(prepared.x_train[idx], preprocess.one_hot_centered(
          prepared.y_train[idx], prepared.num_classes), prepared.y_train[idx])
      report['random_real'] = evaluate_support(real, prepared, cfg, settings, kernel_backend)
  finally:
    getattr(kernel_backend, 'close', lambda: None)()
  run_files.write_json(out, report)
  report['written_to'] = str(out)
  return report


def _protocol_line(report: dict[str, Any]) -> str:
  """The finite networks' protocol, its steps, and whether they were shortened."""
  first = next(iter(report['distilled']['transfer'].values()))
  config, protocol = first['train_config'], report.get('protocol', 'ntkdd')
  steps = f"{config['steps']} {config['optimizer']} steps per network"
  paper_steps = first.get('paper_steps')
  if paper_steps is not None and paper_steps != config['steps']:
    steps += f' (shortened by --train-steps from the paper\'s {paper_steps})'
  parameterization = first['arch']['parameterization']
  mirrored = '; the distilled set with its mirror images' if first.get('mirror_images') else ''
  return (f'finite networks: --protocol {protocol}, {steps}, {parameterization} '
          f'parameterisation{mirrored}')


def format_report(report: dict[str, Any]) -> str:
  rows = [('set', 'KRR test acc', *[f'{k} (mean ± std)' for k in
                                    report['distilled']['transfer']])]
  for name in ('distilled', 'random_real'):
    if name not in report:
      continue
    r = report[name]
    krr = 'not computed' if r['krr'] is None else f"{100 * r['krr']['test_accuracy']:.2f}%"
    rows.append((name, krr,
                 *[f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f}%"
                   for t in r['transfer'].values()]))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = [f"{report['dataset']}: {report['images']} support images ({report['support']})"]
  if report['distilled']['transfer']:
    lines.append(_protocol_line(report))
  lines += ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.append(f"written to {report['written_to']}")
  return '\n'.join(lines)
