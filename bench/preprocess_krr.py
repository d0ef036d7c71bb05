"""Owns the preprocessing comparison: KRR test accuracy of random real images per class under standardisation, KIP's ZCA and the channel ZCA, with one kernel.

For each seed, the same class-balanced random real train images (drawn from the labels, before
any preprocessing) are the support set of every variant; each variant is fitted on the whole
train split, applied to the support and test images, and scored by kernel ridge regression
(K_ss + reg tr(K_ss)/n I, centred one-hot labels) on the test images. The issue's measurement is
CIFAR-10, 10 images per class, the ConvNet kernel at 32x32, depth 3, the whole test split
(--test-size 0): 10^6 kernel pairs per variant and seed.

  .venv/bin/python bench/preprocess_krr.py --data-dir /work/shared/data            # the full run
  .venv/bin/python bench/preprocess_krr.py --data-dir /work/shared/data --variants kip_zca \
      --workers 2 --kernel-cache runs/krr-cache     # one variant on both cores, resumable
  .venv/bin/python bench/preprocess_krr.py --data-dir /work/shared/data --ipc 1 --test-size 300

Each variant and seed is about an hour of kernels on one core, so --kernel-cache DIR keeps every
kernel chunk (--chunk test images against the support) as it is computed: a killed run started
again with the same arguments and directory computes only the chunks it lacks.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import sys
import time
from typing import Any, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_throughput import write_json  # noqa: E402  (bench/kernel_throughput.py)

DEFAULT_VARIANTS = 'standardize,kip_zca,channel_zca'


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--dataset', default='cifar10')
  parser.add_argument('--data-dir', default='data')
  parser.add_argument('--cache-dir', default=None, help='decoded-dataset cache (ntkdd default)')
  parser.add_argument('--variants', default=DEFAULT_VARIANTS,
                      help='comma-separated preprocessing kinds (ntkdd.common.preprocess)')
  parser.add_argument('--ipc', type=int, default=10, help='random real images per class')
  parser.add_argument('--seeds', default='0', help='comma-separated seeds of the support draw')
  parser.add_argument('--test-size', type=int, default=0,
                      help='test images (a fixed class-balanced subset, seed 0); 0: the whole '
                           'test split (the measurement; anything else is a smoke run)')
  parser.add_argument('--arch', default='convnet', choices=('convnet', 'fc'))
  parser.add_argument('--depth', type=int, default=3)
  parser.add_argument('--kernel', default='ntk', choices=('ntk', 'nngp'))
  parser.add_argument('--reg', type=float, default=1e-6)
  parser.add_argument('--zca-strength', type=float, default=0.1)
  parser.add_argument('--tile', type=int, default=None,
                      help='largest kernel tile side (default: the largest that fits memory)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'float64'))
  parser.add_argument('--workers', type=int, default=0,
                      help='kernel worker threads in this process (0: the engine called '
                           'directly); 2 keeps both cores of a 2-core machine busy')
  parser.add_argument('--chunk', type=int, default=500,
                      help='test images per kernel call (the unit --kernel-cache keeps)')
  parser.add_argument('--kernel-cache', default=None, metavar='DIR',
                      help='keep each computed kernel chunk in DIR (atomic .npz files named by '
                           'a hash of the images and the kernel settings); a run started again '
                           'with the same DIR reuses them and resumes where it stopped')
  parser.add_argument('--json', default=None,
                      help='default bench/results/preprocess_krr_<dataset>_<ipc>ipc_<test>.json')
  return parser.parse_args(argv)


def test_subset(labels: np.ndarray, size: int) -> np.ndarray:
  """All test indices (size 0 or >= the split), else a fixed class-balanced subset."""
  from ntkdd.common import preprocess
  if size <= 0 or size >= len(labels):
    return np.arange(len(labels))
  return np.sort(preprocess.class_balanced_batch(labels, size, np.random.default_rng(0)))


class DiskCachedKernels:
  """A kernel backend that keeps each `kernel(x1, x2)` answer in a directory.

  The file name hashes the two image arrays (bytes, shapes, dtypes) and `settings` (the
  kernel's architecture, dtype and anything else that changes the numbers), so a cached answer
  is only reused for the same question. Writes are atomic: a killed run leaves whole files.
  """

  def __init__(self, backend: Any, directory: str, settings: str):
    self.backend, self.directory, self.settings = backend, directory, settings
    self.hits = 0
    os.makedirs(directory, exist_ok=True)

  def _path(self, x1: np.ndarray, x2: Optional[np.ndarray]) -> str:
    digest = hashlib.sha256(self.settings.encode())
    for x in (x1, x2):
      if x is None:
        digest.update(b'none')
        continue
      x = np.ascontiguousarray(x)
      digest.update(f'{x.shape}{x.dtype}'.encode())
      digest.update(x.tobytes())
    return os.path.join(self.directory, f'kernel-{digest.hexdigest()[:32]}.npz')

  def kernel(self, x1: np.ndarray, x2: Optional[np.ndarray] = None) -> dict:
    from ntkdd.server import run_dir
    path = self._path(x1, x2)
    if os.path.exists(path):
      self.hits += 1
      with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}
    out = self.backend.kernel(x1, x2)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in out.items()})
    run_dir.atomic_write_bytes(path, buffer.getvalue())
    return out


def kernel_engine(args: argparse.Namespace, arch: Any) -> Any:
  """The kernel backend of --workers: the engine called directly, or worker threads (what
  `ntkdd --launch inprocess --workers N` builds, blocks fitted to each call)."""
  from ntkdd.launch import launch_types
  flags = argparse.Namespace(workers=args.workers, tile=args.tile, dtype=args.dtype, block=None)
  return launch_types.LAUNCHES['inprocess'].backend_factory(flags)(arch)


def run(args: argparse.Namespace) -> dict[str, Any]:
  from ntkdd.common import architectures, data
  dataset = data.load_dataset(args.dataset, args.data_dir, cache_dir=args.cache_dir)
  arch = architectures.Architecture(args.arch, depth=args.depth)
  engine = kernel_engine(args, arch)
  kernels_backend = engine
  if args.kernel_cache:
    kernels_backend = DiskCachedKernels(
        engine, args.kernel_cache, f'{args.arch} depth {args.depth} {args.dtype} {args.dataset}')
  try:
    return measure(args, dataset, kernels_backend)
  finally:
    getattr(engine, 'close', lambda: None)()


def measure(args: argparse.Namespace, dataset: Any, kernels_backend: Any) -> dict[str, Any]:
  """KRR test accuracy per variant and seed (see the module docstring)."""
  from ntkdd.common import kip, preprocess
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  test_idx = test_subset(np.asarray(dataset.y_test), args.test_size)
  y_test = np.asarray(dataset.y_test)[test_idx]
  supports = {seed: preprocess.class_balanced_indices(
      np.asarray(dataset.y_train), args.ipc, np.random.default_rng(seed),
      num_classes=dataset.num_classes) for seed in seeds}
  results = []
  for variant in variants:
    start = time.perf_counter()
    pre = preprocess.make_preprocessor(variant, dataset.x_train, args.zca_strength)
    fit_s = time.perf_counter() - start
    x_test = pre.apply(dataset.x_test[test_idx])
    for seed in seeds:
      idx = supports[seed]
      labels = preprocess.one_hot_centered(np.asarray(dataset.y_train)[idx], dataset.num_classes)
      start = time.perf_counter()
      accuracy = kip.krr_accuracy(kernels_backend, pre.apply(dataset.x_train[idx]), labels,
                                  x_test, y_test, kernel_name=args.kernel, reg=args.reg,
                                  chunk=args.chunk)
      seconds = time.perf_counter() - start
      results.append({'variant': variant, 'seed': seed, 'accuracy': accuracy,
                      'kernel_s': seconds, 'fit_s': fit_s, 'support_indices': idx.tolist()})
      print(f'{variant:12s} seed {seed}: {100 * accuracy:.2f}% ({seconds:.0f} s of kernels, '
            f'{fit_s:.0f} s fitting)', file=sys.stderr, flush=True)
  return {'results': results, 'test_images': int(len(test_idx)),
          'whole_test_split': bool(len(test_idx) == len(dataset.y_test)),
          'support_size': args.ipc * dataset.num_classes}


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
  rows = []
  by_variant: dict[str, list[float]] = {}
  for r in report['results']:
    by_variant.setdefault(r['variant'], []).append(r['accuracy'])
  for variant, accs in by_variant.items():
    accs = 100 * np.asarray(accs)
    spread = f' +- {accs.std():.2f}' if len(accs) > 1 else ''
    rows.append([variant, str(len(accs)), f'{accs.mean():.2f}{spread}'])
  return rows


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  from ntkdd.common import kernels
  kernels.enable_float64_if(args.dtype)
  start = time.perf_counter()
  report = run(args)
  import jax
  report.update(config=vars(args), seconds=time.perf_counter() - start,
                env={'python': platform.python_version(), 'jax': jax.__version__,
                     'backend': jax.default_backend(), 'cpu_count': os.cpu_count()})
  label = ('whole test split' if report['whole_test_split']
           else f"SUBSET of {report['test_images']} test images (a smoke run, not the measurement)")
  print(f"\n{args.dataset}, {args.ipc} random real images per class, {args.arch} depth "
        f"{args.depth} {args.kernel}, reg {args.reg}, {label}:\n")
  header = ['preprocessing', 'seeds', 'KRR test accuracy %']
  rows = summary_rows(report)
  print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')
  write_json(report, args.json,
             f'preprocess_krr_{args.dataset}_{args.ipc}ipc_{report["test_images"]}test.json')
  print(f'{report["seconds"]:.0f} s in all')


if __name__ == '__main__':
  main()
