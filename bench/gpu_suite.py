"""Owns the one-call GPU suite: kernel throughput, LS and KIP ConvNet on CIFAR-10, RCIG steps/s.

`make bench-gpu` (or `python bench/gpu_suite.py`) runs each part in a subprocess of its own with
its own time limit, so one slow part cannot starve the others; a part that runs out of time
is killed and recorded as `timeout` with whatever it had measured so far. Everything goes to
bench/results/gpu_suite.json and a Markdown table (bench/results/gpu_suite.md, also printed):

  environment  device name and memory, JAX, jaxlib, CUDA and Python versions;
  kernel       ConvNet depth 3 at 32x32x3 and 28x28x1, float32, forward and vjp, through the
               public `kernels.compute_kernel` / `kernels.kernel_vjp`: the tile left to auto,
               then explicit tiles doubling until one does not fit (out of memory) or a call
               gets too slow; achieved FLOP/s (bench/flops.py's model) against the device's
               fp32 peak (a table by device name; `unknown` elsewhere) and a measured matmul;
  ls           Label Solve, ConvNet, CIFAR-10, 10 images per class, targets = the whole train
               split, KRR accuracy on the whole test split (paper: 53.6%);
  kip          KIP, ConvNet, CIFAR-10, 1 image per class with learned labels, as many steps
               as fit in --kip-seconds, then KRR accuracy on the whole test split (paper: 63.4%);
  rcig         RCIG steps per second at MNIST, 1 image per class (paper settings);
  rcig_mnist   (only when --parts names it) an RCIG MNIST 1-image-per-class run with the
               paper's 1024-image target batch from the best set of the CPU runs
               (results/rcig-mnist-1ipc-warm-b1024), as many steps as fit in
               --rcig-mnist-seconds (a first stretch measures the pace, then the run resumes
               with a cosine sized to the rest), then the paper's evaluation (5 ReLU ConvNets,
               the whole test split; bench/rcig_eval.py). The set, its config, metrics and
               evaluation are written beside --out as rcig_mnist_*: with gpu_suite.json and
               .md, 6 files, which a device call's $OUT brings back.

Nothing is installed or downloaded: `pip install --no-deps --no-build-isolation .` into the
machine's Python (with JAX) is enough, and without it the parts import this checkout (a
symlink tree on PYTHONPATH). The core needs only jax and numpy; CIFAR-10 from the
JPEG tarball needs Pillow and RCIG needs optax: without them those parts say so and are
recorded as `skipped`. `--smoke` runs every part at tiny sizes on synthetic data (CPU, under
two minutes) and writes the same JSON keys.

  python bench/gpu_suite.py --data-dir ../shared/data
  python bench/gpu_suite.py --smoke
  python bench/gpu_suite.py --parts environment,rcig_mnist --rcig-mnist-seconds 420
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402  (bench/flops.py, next to this file)

RESULT_MARKER = 'GPU_SUITE_PART_RESULT '
PARTS = ('environment', 'kernel', 'ls', 'kip', 'rcig', 'rcig_mnist')
DEFAULT_PARTS = ('environment', 'kernel', 'ls', 'kip', 'rcig')   # rcig_mnist: when asked for
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / 'results' / 'gpu_suite.json'
PAPER = {'ls': 0.536, 'kip': 0.634, 'rcig_mnist': 0.947}
# What each part records when it runs to the end (smoke or not: the same keys).
PART_KEYS = {
    'environment': ('backend', 'device_kind', 'device_count', 'python', 'jax', 'jaxlib', 'numpy',
                    'jax_memory_limit_bytes', 'cuda', 'nvidia_smi', 'jax_environment_info',
                    'peak_fp32_flops',
                    'optional_modules', 'cpu_count'),
    'kernel': ('peak_fp32_flops', 'matmul_error', 'measured_matmul_fp32_gflops', 'sizes'),
    'ls': ('load_s', 'kernel_progress', 'support', 'targets', 'test_images', 'solve_s', 'eval_s',
           'krr_test_accuracy', 'paper_accuracy', 'pairs_per_s'),
    'kip': ('load_s', 'kernel_progress', 'budget_s', 'target_batch', 'distill_s', 'steps',
            'krr_test_accuracy_initial', 'steps_per_s', 'pairs_per_s', 'eval_s', 'test_images',
            'krr_test_accuracy', 'paper_accuracy'),
    'rcig': ('config', 'budget_s', 'steps', 'first_step_s', 'steps_per_s'),
    'rcig_mnist': ('config', 'init_support', 'budget_s', 'first_stretch_steps', 'planned_steps',
                   'steps', 'distill_s', 'steps_per_s', 'test_accuracy', 'test_accuracy_std',
                   'models', 'test_images', 'files', 'paper_accuracy'),
}
KERNEL_SIZE_KEYS = ('size', 'auto_tile', 'auto_forward', 'auto_vjp', 'tile_sweep_forward',
                    'sweep_stopped', 'largest_tile', 'largest_forward', 'largest_vjp')

# float32 peak without tensor cores (TFLOP/s), from the vendors' data sheets; the first name
# found in the device kind wins, so the specific ones come first.
FP32_PEAK_TFLOPS = (
    ('GH200', 67.0), ('H200', 67.0), ('H100 PCIe', 51.2), ('H100 NVL', 60.0), ('H100', 67.0),
    ('H800', 67.0), ('B200', 80.0), ('A100', 19.5), ('A800', 19.5), ('L40S', 91.6),
    ('L40', 90.5), ('L4', 30.3), ('A10G', 31.2), ('A10', 31.2), ('V100', 15.7), ('T4', 8.1),
    ('RTX 4090', 82.6), ('RTX 3090', 35.6),
)


def peak_fp32_flops(device_kind: str) -> Optional[float]:
  """The device's float32 (non-tensor-core) peak FLOP/s by name, or None when unknown."""
  for name, tflops in FP32_PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops * 1e12
  return None


# ----------------------------------------------------------------------------------------------
# Sizes: the real suite and the smoke one (same parts, same keys).

def settings(smoke: bool) -> dict[str, Any]:
  """Every size the parts use; --smoke shrinks them to seconds on a CPU."""
  if smoke:
    # Tile 4 everywhere: the auto and explicit calls share one compiled forward and one vjp;
    # depth 1 compiles in a fraction of depth 3's time.
    return {'depth': 1, 'kernel_sizes': [(8, 8, 3)], 'kernel_rows': 4, 'kernel_columns': 4,
            'kernel_min_call_s': 0.0, 'kernel_max_call_s': 2.0, 'kernel_sweep_start': 4,
            'kernel_max_tile': 4, 'kernel_tile_factor': 4,
            'matmul_size': 256, 'image_size': 8, 'ls_ipc': 1, 'ls_targets': 40,
            'test_size': 20, 'kip_ipc': 1, 'kip_target_batch': 10,
            'rcig': dict(width=4, depth=2, inner_steps=1, hinv_steps=1, pool_size=2,
                         pool_train_steps=1, target_batch=8), 'rcig_image_size': 14,
            'rcig_seconds': 8,
            'rcig_mnist': {'config': dict(width=4, depth=2, inner_steps=1, hinv_steps=1,
                                          pool_size=2, pool_train_steps=1, target_batch=8,
                                          lr_images=0.005, checkpoint_every=5),
                           'seed': 2, 'first_plan_steps': 1000, 'first_stretch_s': 1,
                           'eval_reserve_s': 45,
                           'eval_flags': ['--models', '1', '--train-steps', '5',
                                          '--test-size', '20']}}
  return {'depth': 3, 'kernel_sizes': [(32, 32, 3), (28, 28, 1)], 'kernel_rows': 64,
          'kernel_columns': 64, 'kernel_min_call_s': 1.0, 'kernel_max_call_s': 15.0,
          'kernel_sweep_start': None, 'kernel_max_tile': 4096, 'kernel_tile_factor': 4,
          'matmul_size': 8192, 'image_size': None, 'ls_ipc': 10, 'ls_targets': 0,
          'test_size': 0, 'kip_ipc': 1, 'kip_target_batch': 1000, 'rcig': {},
          'rcig_image_size': None, 'rcig_seconds': 80,
          # The paper's target batch; AdaBelief 0.005 on the images (0.003 labels, 0.03
          # temperature), decayed by a cosine: the CPU runs' warm restarts.
          # Checkpoints (the 30-model pool, ~0.6 GB) every 500 steps: a GPU's steps are short.
          'rcig_mnist': {'config': dict(target_batch=1024, lr_images=0.005, checkpoint_every=500),
                         'seed': 2, 'first_plan_steps': 10000, 'first_stretch_s': 60,
                         'eval_reserve_s': 150, 'eval_flags': ['--models', '5']}}


def limits(args: argparse.Namespace) -> dict[str, float]:
  """Per-part time limits (s); the suite's total stays within --total-seconds."""
  if args.smoke:
    # Limits, not durations: about 70 s in all on two quiet cores, more on a busy machine.
    return {'environment': 30, 'kernel': 60, 'ls': 60, 'kip': 60, 'rcig': 60,
            'rcig_mnist': args.rcig_mnist_seconds + 90}
  return {'environment': 45, 'kernel': 140, 'ls': 140, 'kip': args.kip_seconds + 60,
          'rcig': 100,   # 575 s for the default parts with the default --kip-seconds
          'rcig_mnist': args.rcig_mnist_seconds + 180}


# ----------------------------------------------------------------------------------------------
# Parts (each runs in its own process; `record` keeps what is done so far in a file, so a
# part killed at its limit still reports it).

class Recorder:
  """The part's result dict, rewritten atomically to a file after every `record`."""

  def __init__(self, path: Optional[str]):
    self.path = path
    self.result: dict[str, Any] = {}

  def record(self, key: str, value: Any) -> None:
    self.result[key] = value
    if self.path:
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(self.result, f, default=_json_default)
      os.replace(tmp, self.path)


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  return str(value)


def _require(module: str, why: str) -> None:
  """ImportError naming the missing optional dependency and what needs it."""
  try:
    __import__(module)
  except ImportError as e:
    raise MissingDependency(f'{why} needs {module}, which this Python lacks ({e}); '
                            f'pip install {module} where the network allows it') from e


class MissingDependency(ImportError):
  """An optional dependency of one part is missing: the part is skipped, the suite goes on."""


def part_environment(spec: dict, rec: Recorder) -> None:
  import jax
  device = jax.devices()[0]
  rec.record('backend', jax.default_backend())
  rec.record('device_kind', device.device_kind)
  rec.record('device_count', jax.device_count())
  rec.record('python', platform.python_version())
  rec.record('jax', jax.__version__)
  try:
    import jaxlib
    rec.record('jaxlib', jaxlib.__version__)
  except ImportError:
    rec.record('jaxlib', None)
  rec.record('numpy', np.__version__)
  stats = {}
  try:
    stats = device.memory_stats() or {}
  except Exception:  # CPU devices have no memory statistics
    pass
  rec.record('jax_memory_limit_bytes', stats.get('bytes_limit'))
  rec.record('cuda', _cuda_versions())
  rec.record('nvidia_smi', _nvidia_smi())
  try:
    info = jax.print_environment_info(return_string=True)
  except Exception as e:  # pylint: disable=broad-except  # informative only
    info = f'unavailable: {e}'
  rec.record('jax_environment_info', info)
  peak = peak_fp32_flops(device.device_kind) if jax.default_backend() == 'gpu' else None
  rec.record('peak_fp32_flops', peak if peak else 'unknown')
  optional = {}
  for module in ('PIL', 'optax', 'tqdm', 'tensorboardX', 'matplotlib'):
    try:
      optional[module] = getattr(__import__(module), '__version__', 'present')
    except ImportError:
      optional[module] = None
  rec.record('optional_modules', optional)
  rec.record('cpu_count', os.cpu_count())


def _cuda_versions() -> dict[str, Any]:
  """CUDA runtime/driver/cuDNN versions as jaxlib reports them (None where it does not)."""
  out: dict[str, Any] = {}
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
  except Exception:
    cuda_versions = None
  if cuda_versions is not None:
    for name in ('cuda_runtime_get_version', 'cuda_runtime_build_version',
                 'cuda_driver_get_version', 'cudnn_get_version', 'cudnn_build_version',
                 'cublas_get_version', 'cusolver_get_version'):
      try:
        out[name.replace('_get_version', '')] = getattr(cuda_versions, name)()
      except Exception:
        continue
  return out


def _nvidia_smi() -> Optional[dict[str, str]]:
  try:
    done = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                           '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if done.returncode != 0 or not done.stdout.strip():
    return None
  name, memory, driver = [v.strip() for v in done.stdout.strip().splitlines()[0].split(',')][:3]
  return {'name': name, 'memory_total': memory, 'driver_version': driver}


def _is_out_of_memory(error: BaseException) -> bool:
  text = f'{type(error).__name__} {error}'
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def _timed(call: Callable[[], Any]) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def part_kernel(spec: dict, rec: Recorder) -> None:
  """ConvNet kernel throughput through the public blocked functions, auto and explicit tiles."""
  import jax
  from ntkdd.common import architectures, kernels
  cfg = spec['settings']
  start = time.monotonic()
  budget = spec['limit_s'] - 10
  backend = jax.default_backend()
  peak = peak_fp32_flops(jax.devices()[0].device_kind) if backend == 'gpu' else None
  rec.record('peak_fp32_flops', peak if peak else 'unknown')
  matmul, error = None, None
  try:
    matmul = flops.measure_jax_matmul_peak_gflops(size=cfg['matmul_size'], repeats=3)
  except Exception as e:  # pylint: disable=broad-except  # out of memory: no measured peak
    error = str(e)[:300]
  rec.record('matmul_error', error)
  rec.record('measured_matmul_fp32_gflops', matmul)
  arch = architectures.Architecture('convnet', cfg['depth'])
  rng = np.random.default_rng(0)
  sizes = {}
  for index, size in enumerate(map(tuple, cfg['kernel_sizes'])):
    # Each size gets its share of the part's time, so the last is measured too.
    deadline = start + budget * (index + 1) / len(cfg['kernel_sizes'])
    key = 'x'.join(map(str, size))
    entry: dict[str, Any] = {'size': key, 'auto_tile': _auto_tile(arch, size)}
    sizes[key] = entry
    rec.record('sizes', sizes)

    def rate(pairs: int, seconds: float, tile: Optional[int], kind: str) -> dict[str, Any]:
      per_pair = flops.flops_per_pair(*size, cfg['depth'], tile=tile)
      if kind == 'vjp':
        per_pair *= flops.VJP_FLOP_FACTOR
      achieved = pairs / seconds * per_pair
      return {'pairs': pairs, 'seconds': seconds, 'pairs_per_s': pairs / seconds,
              'flops_per_pair': per_pair, 'achieved_flops': achieved,
              'percent_of_peak': 100 * achieved / peak if peak else None,
              'percent_of_matmul': 100 * achieved / (matmul * 1e9) if matmul else None}

    # Auto: the tile left to compute_kernel / kernel_vjp, on support-by-targets shapes grown
    # until one call takes at least kernel_min_call_s.
    rows = cfg['kernel_rows']
    x1 = rng.standard_normal((rows,) + size).astype(np.float32)
    columns = cfg['kernel_columns']
    for kind in ('forward', 'vjp'):
      n2 = columns
      while True:
        x2 = rng.standard_normal((n2,) + size).astype(np.float32)
        if kind == 'forward':
          call = lambda: kernels.compute_kernel(arch, x1, x2)
        else:
          g = rng.standard_normal((rows, n2)).astype(np.float32)
          call = lambda: kernels.kernel_vjp(arch, x1, x2, g_ntk=g, g_nngp=g)
        first = _timed(call)   # compiles
        seconds = _timed(call)
        auto = _auto_tile(arch, size, vjp=kind == 'vjp')
        used = None if auto is None else [min(auto, rows), min(auto, n2)]
        entry[f'auto_{kind}'] = dict(rate(rows * n2, seconds, used and used[0], kind),
                                     first_call_s=first, shape=[rows, n2], tile_used=used)
        rec.record('sizes', sizes)
        if (seconds >= cfg['kernel_min_call_s'] or 4 * n2 > 64 * columns
            or time.monotonic() + 6 * seconds > deadline):
          break
        n2 *= 4
    # Explicit tiles: one square tile per call, growing until out of memory, too slow, the
    # cap, or the part's time is nearly spent (entry['sweep_stopped'] says which).
    sweep, largest, stopped = [], None, 'max_tile'
    tile = cfg['kernel_sweep_start'] or max(1, entry['auto_tile'] or 8)
    while tile <= cfg['kernel_max_tile']:
      if time.monotonic() >= deadline:
        stopped = 'time_budget'
        break
      timed = _time_square_tile(arch, size, tile, 'forward', rng)
      if timed is None:
        sweep.append({'tile': tile, 'out_of_memory': True})
        stopped = 'out_of_memory'
        break
      first, seconds = timed
      sweep.append(dict(rate(tile * tile, seconds, tile, 'forward'), tile=tile,
                        first_call_s=first))
      largest = tile
      entry.update(tile_sweep_forward=sweep, largest_tile=largest)
      rec.record('sizes', sizes)
      if seconds > cfg['kernel_max_call_s']:
        stopped = 'call_time'
        break
      next_seconds = seconds * cfg['kernel_tile_factor'] ** 2
      if time.monotonic() + first + 2 * next_seconds > deadline:
        stopped = 'time_budget'
        break
      tile *= cfg['kernel_tile_factor']
    entry.update(tile_sweep_forward=sweep, sweep_stopped=stopped, largest_tile=largest,
                 largest_forward=None, largest_vjp=None)
    if largest:
      entry['largest_forward'] = next(s for s in sweep if s.get('tile') == largest)
      # vjp (about VJP_FLOP_FACTOR forwards) at the largest tile whose call fits the time
      # cap, halved until it fits in memory.
      fitting = [s['tile'] for s in sweep if 'seconds' in s and
                 s['seconds'] * flops.VJP_FLOP_FACTOR <= max(cfg['kernel_max_call_s'], 1e-9)]
      tile = max(fitting) if fitting else min(s['tile'] for s in sweep if 'seconds' in s)
      while tile >= 1 and time.monotonic() < deadline:
        timed = _time_square_tile(arch, size, tile, 'vjp', rng)
        if timed is None:
          tile //= 2
          continue
        first, seconds = timed
        entry['largest_vjp'] = dict(rate(tile * tile, seconds, tile, 'vjp'), tile=tile,
                                    first_call_s=first)
        break
    rec.record('sizes', sizes)


def _time_square_tile(arch, size, tile: int, kind: str,
                      rng: np.random.Generator) -> Optional[tuple[float, float]]:
  """(first call s, second call s) of one tile x tile block of random images through the
  public compute_kernel / kernel_vjp with this explicit tile; None when it runs out of memory."""
  from ntkdd.common import kernels
  xa = rng.standard_normal((tile,) + size).astype(np.float32)
  xb = rng.standard_normal((tile,) + size).astype(np.float32)
  if kind == 'forward':
    call = lambda: kernels.compute_kernel(arch, xa, xb, tile=tile)
  else:
    g = rng.standard_normal((tile, tile)).astype(np.float32)
    call = lambda: kernels.kernel_vjp(arch, xa, xb, g_ntk=g, g_nngp=g, tile=tile)
  try:
    return _timed(call), _timed(call)
  except Exception as e:  # pylint: disable=broad-except  # XLA raises its own error types
    if not _is_out_of_memory(e):
      raise
    return None


def _auto_tile(arch, size, vjp: bool = False) -> Optional[int]:
  """The tile compute_kernel (kernel_vjp with `vjp`) picks for these images, where kernels
  can say (else None)."""
  from ntkdd.common import kernels
  try:
    return int(kernels.auto_tile(arch, size, 'float32', vjp=vjp))
  except Exception:  # the tile policy's signature may change; the measurement does not need it
    return None


def _prepare(dataset: str, data_dir: str, image_size: Optional[int], depth: int,
             arch: str = 'convnet'):
  from ntkdd.server import distill
  cfg = distill.DistillConfig(dataset=dataset, data_dir=data_dir, arch=arch, depth=depth,
                              image_size=image_size)
  return distill.prepare_data(cfg)


def _load_cifar10(spec: dict, rec: Recorder):
  """(dataset, data dir, prepared data) of the CIFAR-10 parts: the smoke's synthetic npz, else
  CIFAR-10 from --data-dir; the load time is recorded."""
  if spec['smoke']:
    dataset, data_dir = spec['smoke_data']['cifar10'], '.'
  else:
    dataset, data_dir = 'cifar10', spec['data_dir']
    folder = Path(data_dir)
    if (folder / 'cifar10-jpg.tar.gz').exists() or (folder / 'cifar10').is_dir():
      _require('PIL', 'CIFAR-10 from the JPEG copy (decoding the images)')
  start = time.perf_counter()
  prepared = _prepare(dataset, data_dir, spec['settings']['image_size'],
                      spec['settings']['depth'])
  rec.record('load_s', time.perf_counter() - start)
  return dataset, data_dir, prepared


def _recording_backend(arch, rec: Recorder):
  """The in-process kernel backend, recording its pairs and pairs/s after each kernel call
  (`kernel_progress`), so a part stopped at its limit still says how far it got."""
  from ntkdd.server import backend as backend_lib

  class Recording(backend_lib.InProcessKernels):
    def _count(self, pairs: int, start: float) -> None:
      super()._count(pairs, start)
      rec.record('kernel_progress', {'pairs': self.pairs, 'seconds': self.seconds,
                                     'pairs_per_s': self.pairs_per_second()})

  return Recording(arch)


def part_ls(spec: dict, rec: Recorder) -> None:
  from ntkdd.common import kip, preprocess
  from ntkdd.server import distill, run_data
  cfg = spec['settings']
  _, _, prepared = _load_cifar10(spec, rec)
  run = distill.DistillConfig(algorithm='ls', arch='convnet', depth=cfg['depth'],
                              ipc=cfg['ls_ipc'])
  backend = _recording_backend(run.architecture(), rec)
  rng = np.random.default_rng(0)
  images, labels, _ = run_data.initial_support(prepared, cfg['ls_ipc'], 'real', rng)
  targets = np.arange(len(prepared.x_train))
  if cfg['ls_targets']:
    targets = np.sort(preprocess.class_balanced_batch(prepared.y_train, cfg['ls_targets'], rng,
                                                      num_classes=prepared.num_classes))
  test = np.arange(len(prepared.x_test))[:cfg['test_size'] or None]
  rec.record('support', len(images))
  rec.record('targets', len(targets))
  rec.record('test_images', len(test))
  y_t = preprocess.one_hot_centered(prepared.y_train[targets], prepared.num_classes)
  start = time.perf_counter()
  solved = kip.label_solve(backend, images, prepared.x_train[targets], y_t, run.kernel,
                           run.reg, run.ls_rcond)
  rec.record('solve_s', time.perf_counter() - start)
  start = time.perf_counter()
  accuracy = kip.krr_accuracy(backend, images, solved, prepared.x_test[test],
                              prepared.y_test[test], run.kernel, run.reg)
  rec.record('eval_s', time.perf_counter() - start)
  rec.record('krr_test_accuracy', accuracy)
  rec.record('paper_accuracy', PAPER['ls'])
  rec.record('pairs_per_s', backend.pairs_per_second())


class _StopAfter:
  """SIGTERM to this process once `seconds` have passed, `ready()` (if given) holds and a
  distillation loop is listening (its stop handler, a bound method, is installed): the loop
  then finishes its step, checkpoints and raises distill.Interrupted, its documented graceful
  stop."""

  def __init__(self, seconds: float, ready: Optional[Callable[[], bool]] = None):
    self._cancelled = threading.Event()
    self._ready = ready or (lambda: True)
    self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
    self._thread.start()

  def _run(self, seconds: float) -> None:
    if self._cancelled.wait(seconds):
      return
    while not self._cancelled.is_set():
      if (getattr(signal.getsignal(signal.SIGTERM), '__self__', None) is not None
          and self._ready()):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      self._cancelled.wait(0.2)

  def cancel(self) -> None:
    self._cancelled.set()


def _until_stopped(run: Callable[[], Any], seconds: float,
                   ready: Optional[Callable[[], bool]] = None) -> None:
  """Runs a distillation loop (`run()`) until it ends or `_StopAfter(seconds, ready)` stops it
  (the loop then checkpointed its last step)."""
  from ntkdd.server import distill
  timer = _StopAfter(max(seconds, 0.0), ready)
  try:
    run()
  except distill.Interrupted:
    pass
  finally:
    timer.cancel()


def _step_walls(run_dir: Path) -> dict[int, float]:
  """{step: seconds of step time since the run began} from the run's metrics.jsonl."""
  from ntkdd.server import run_dir as run_dir_lib
  return {r['step']: r['wall_time'] for r in run_dir_lib.read_metrics(run_dir)
          if r.get('wall_time') is not None}


def _steps_per_s(walls: dict[int, float]) -> Optional[float]:
  """Steps per second after step 1 (which compiles: it is left out)."""
  steps = max(walls)
  return (steps - 1) / (walls[steps] - walls[1]) if steps >= 2 else None


def _mnist_source(spec: dict) -> tuple[str, str]:
  """(dataset, data dir) of the MNIST parts: the smoke's synthetic npz, else MNIST."""
  if spec['smoke']:
    return spec['smoke_data']['mnist'], '.'
  return 'mnist', spec['data_dir']


def part_kip(spec: dict, rec: Recorder) -> None:
  from ntkdd.common import kip
  from ntkdd.server import distill
  from ntkdd.server import run_dir as run_dir_lib
  cfg = spec['settings']
  dataset, data_dir, prepared = _load_cifar10(spec, rec)
  run = distill.DistillConfig(
      algorithm='kip', dataset=dataset, data_dir=data_dir, arch='convnet', depth=cfg['depth'],
      image_size=cfg['image_size'], ipc=cfg['kip_ipc'], steps=10 ** 9, learn_labels=True,
      learning_rate=0.01, target_batch=cfg['kip_target_batch'], eval_every=10 ** 9,
      eval_test_size=cfg['test_size'] or 0, checkpoint_every=10 ** 9, seed=0)
  run_dir = Path(spec['work_dir']) / 'kip'
  budget = spec['kip_seconds']
  rec.record('budget_s', budget)
  rec.record('target_batch', run.target_batch)
  backend = _recording_backend(run.architecture(), rec)
  start = time.perf_counter()
  _until_stopped(lambda: distill.distill(run, str(run_dir), lambda arch: backend,
                                         progress=False, prepared=prepared), budget)
  rec.record('distill_s', time.perf_counter() - start)
  records = run_dir_lib.read_metrics(run_dir)
  steps = max(r['step'] for r in records)
  rec.record('steps', steps)
  rec.record('krr_test_accuracy_initial', records[0].get('krr_test_accuracy'))
  rec.record('steps_per_s', _steps_per_s(_step_walls(run_dir)))
  rec.record('pairs_per_s', backend.pairs_per_second())
  with np.load(run_dir / 'support.npz') as support:
    images, labels = support['images'], support['labels']
  test = np.arange(len(prepared.x_test))[:cfg['test_size'] or None]
  start = time.perf_counter()
  accuracy = kip.krr_accuracy(backend, images, labels, prepared.x_test[test],
                              prepared.y_test[test], run.kernel, run.reg)
  rec.record('eval_s', time.perf_counter() - start)
  rec.record('test_images', len(test))
  rec.record('krr_test_accuracy', accuracy)
  rec.record('paper_accuracy', PAPER['kip'])


def part_rcig(spec: dict, rec: Recorder) -> None:
  _require('optax', 'RCIG (its optimisers)')
  from ntkdd.common import rcig
  from ntkdd.server import rcig_loop
  cfg = spec['settings']
  dataset, data_dir = _mnist_source(spec)
  prepared = _prepare(dataset, data_dir, cfg['rcig_image_size'], cfg['depth'])
  rcig_cfg = rcig.RcigConfig(**cfg['rcig'])
  rec.record('config', rcig_cfg.to_dict())
  run_dir = Path(spec['work_dir']) / 'rcig'
  budget = min(spec['limit_s'] - 15, cfg['rcig_seconds'])
  rec.record('budget_s', budget)
  _until_stopped(lambda: rcig_loop.run_rcig(rcig_cfg, prepared, run_dir, ipc=1, steps=10 ** 9,
                                            seed=0), budget)
  walls = _step_walls(run_dir)
  rec.record('steps', max(walls))
  rec.record('first_step_s', walls.get(1))
  rec.record('steps_per_s', _steps_per_s(walls))


# The best MNIST set of the CPU runs (91.02 +- 0.50% under the paper's protocol, BENCHMARKS.md):
# where part rcig_mnist starts.
RCIG_MNIST_INIT = BENCH_DIR.parent / 'results' / 'rcig-mnist-1ipc-warm-b1024' / 'support.npz'


def rcig_mnist_steps(done: int, step_walls: dict[int, float], seconds_left: float) -> int:
  """The run's length once its first stretch has run: the steps done plus as many as the
  stretch's pace (`_steps_per_s`: its steps after the first, which compiles) fits in
  `seconds_left`, less 5% for the checkpoints; at least `done` (nothing timed yet, or no time
  left: the run ends where it is)."""
  steps_per_s = _steps_per_s(step_walls)
  if steps_per_s is None:
    return done
  return done + max(0, int(0.95 * seconds_left * steps_per_s))


def part_rcig_mnist(spec: dict, rec: Recorder) -> None:
  """RCIG MNIST 1 img/class from RCIG_MNIST_INIT for --rcig-mnist-seconds, then the paper's
  evaluation; the set's files are copied beside --out before the evaluation starts, so that a
  part stopped at its limit still leaves the set."""
  _require('optax', 'RCIG (its optimisers)')
  from ntkdd.common import rcig
  from ntkdd.server import rcig_loop
  cfg = spec['settings']['rcig_mnist']
  dataset, data_dir = _mnist_source(spec)
  started = time.monotonic()
  prepared = _prepare(dataset, data_dir, None, cfg['config'].get('depth', 3))
  # The cosine's length is set after the first stretch (resumable: lr_decay_steps), so the
  # run plans with a long one first: near its start a cosine is flat.
  rcig_cfg = rcig.RcigConfig(init_support=str(RCIG_MNIST_INIT), **cfg['config'])
  run_dir = Path(spec['work_dir']) / 'rcig-mnist'
  distill_until = started + min(spec['rcig_mnist_seconds'],
                                spec['limit_s'] - cfg['eval_reserve_s'])
  rec.record('config', rcig_cfg.to_dict())
  rec.record('init_support', str(RCIG_MNIST_INIT.relative_to(BENCH_DIR.parent)))
  rec.record('budget_s', round(distill_until - started, 1))

  def steps_done() -> int:
    try:
      return max(_step_walls(run_dir), default=0)
    except (OSError, ValueError):
      return 0

  def stretch(config, steps: int, seconds: float, resume: bool,
              ready: Optional[Callable[[], bool]] = None) -> None:
    _until_stopped(lambda: rcig_loop.run_rcig(config, prepared, run_dir, ipc=1, steps=steps,
                                              seed=cfg['seed'], resume=resume), seconds, ready)

  first = dataclasses.replace(rcig_cfg, lr_decay_steps=cfg['first_plan_steps'])
  # The first stretch: its seconds, and enough steps after the first (which compiles) to time.
  stretch(first, cfg['first_plan_steps'], cfg['first_stretch_s'], resume=False,
          ready=lambda: steps_done() >= 4 or time.monotonic() >= distill_until)
  walls = _step_walls(run_dir)
  done = max(walls)
  steps = rcig_mnist_steps(done, walls, distill_until - time.monotonic())
  rec.record('first_stretch_steps', done)
  rec.record('planned_steps', steps)
  if steps > done:
    stretch(dataclasses.replace(rcig_cfg, lr_decay_steps=steps), steps,
            distill_until - time.monotonic(), resume=True)
  walls = _step_walls(run_dir)
  rec.record('steps', max(walls))
  rec.record('distill_s', round(time.monotonic() - started, 1))
  rec.record('steps_per_s', _steps_per_s(walls))
  out_dir = Path(spec['out_dir'])
  out_dir.mkdir(parents=True, exist_ok=True)
  files = []
  for name in ('support.npz', 'config.json', 'metrics.jsonl'):
    shutil.copyfile(run_dir / name, out_dir / f'rcig_mnist_{name}')
    files.append(f'rcig_mnist_{name}')
  evaluation = out_dir / 'rcig_mnist_evaluation.json'
  command = [sys.executable, str(BENCH_DIR / 'rcig_eval.py'), '--run', str(run_dir),
             '--dataset', dataset, '--data-dir', data_dir, '--settings', 'paper',
             '--json', str(evaluation)] + cfg['eval_flags']
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=max(
      10.0, spec['limit_s'] - (time.monotonic() - started) - 5))
  row = json.loads(evaluation.read_text())['rows'][0]
  rec.record('test_accuracy', row['mean'])
  rec.record('test_accuracy_std', row['std'])
  rec.record('models', row['models'])
  rec.record('test_images', row['test_images'])
  rec.record('files', files + [evaluation.name])
  rec.record('paper_accuracy', PAPER['rcig_mnist'])


PART_FUNCTIONS = {'environment': part_environment, 'kernel': part_kernel, 'ls': part_ls,
                  'kip': part_kip, 'rcig': part_rcig, 'rcig_mnist': part_rcig_mnist}


def run_part(name: str, spec: dict) -> None:
  """Inside the part's process: runs it and prints its result line."""
  rec = Recorder(spec.get('partial'))
  status, error = 'ok', None
  try:
    PART_FUNCTIONS[name](spec, rec)
  except MissingDependency as e:
    status, error = 'skipped', str(e)
  except ImportError as e:
    if 'ntkdd' in str(e):
      e = ImportError(f'{e}: install this package first: pip install --no-deps '
                      f'--no-build-isolation .')
    status, error = 'error', f'{type(e).__name__}: {e}'
  except Exception as e:  # pylint: disable=broad-except  # recorded; the suite goes on
    status, error = 'error', f'{type(e).__name__}: {e}'[:2000]
  print(RESULT_MARKER + json.dumps({'status': status, 'error': error, 'result': rec.result},
                                   default=_json_default), flush=True)


# ----------------------------------------------------------------------------------------------
# Driver.

def launch_part(name: str, spec: dict, limit_s: float) -> dict[str, Any]:
  """Runs one part in a fresh interpreter, killed at `limit_s`; its record for the JSON."""
  partial = Path(spec['work_dir']) / f'{name}.partial.json'
  spec = dict(spec, limit_s=limit_s, partial=str(partial))
  command = [sys.executable, os.path.abspath(__file__), '--part', name, '--spec',
             json.dumps(spec)]
  env = dict(os.environ)
  if spec.get('pythonpath'):   # ntkdd not installed: the checkout, through a symlink tree
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [spec['pythonpath'],
                                                      env.get('PYTHONPATH')]))
  if spec.get('compilation_cache'):   # later parts and reruns reuse compiled kernels
    env.setdefault('JAX_COMPILATION_CACHE_DIR', spec['compilation_cache'])
  start = time.monotonic()
  record: dict[str, Any] = {'limit_s': round(limit_s, 1)}
  log_path = Path(spec['work_dir']) / f'{name}.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True, env=env)
    try:
      stdout, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      done = _read_json(partial)
      record.update(status='timeout', error=f'killed at its limit of {limit_s:.0f} s',
                    result=done, log_tail=_tail(log_path))
      record['wall_s'] = round(time.monotonic() - start, 1)
      return record
  record['wall_s'] = round(time.monotonic() - start, 1)
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_MARKER):
      record.update(json.loads(line[len(RESULT_MARKER):]))
      if record['status'] != 'ok':
        record['log_tail'] = _tail(log_path)
      return record
  tail = _tail(log_path)
  record.update(status='error', error=f'exit {proc.returncode}: ' + ' | '.join(tail[-8:]),
                result=_read_json(partial), log_tail=tail)
  return record


def _tail(log_path: Path, lines: int = 30) -> list[str]:
  """The last lines the part wrote to stderr (what to read when it failed or ran late)."""
  try:
    return log_path.read_text(errors='replace').strip().splitlines()[-lines:]
  except OSError:
    return []


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def importable_checkout(folder: Path) -> Optional[str]:
  """None when `import ntkdd` works; else a folder whose `ntkdd/` links to this checkout's code
  folders (as setup.py maps them), to put on PYTHONPATH: the suite then needs no install."""
  try:
    subprocess.run([sys.executable, '-c', 'import ntkdd.common.kernels'], check=True,
                   capture_output=True, timeout=120)
    return None
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
    pass
  repo = BENCH_DIR.parent
  package = folder / 'ntkdd_path' / 'ntkdd'
  package.mkdir(parents=True)
  (package / '__init__.py').symlink_to(repo / 'ntkdd' / '__init__.py')
  for name in ('common', 'server', 'workers', 'launch'):
    (package / name).symlink_to(repo / name, target_is_directory=True)
  print(f'[gpu_suite] ntkdd is not installed: using this checkout ({repo})', file=sys.stderr)
  return str(package.parent)


def write_smoke_data(folder: Path) -> dict[str, str]:
  """Tiny synthetic stand-ins with the real shapes: CIFAR-10-like and MNIST-like npz files."""
  rng = np.random.default_rng(0)
  paths = {}
  for name, shape in (('cifar10', (32, 32, 3)), ('mnist', (28, 28, 1))):
    patterns = rng.uniform(0, 1, size=(10,) + shape)

    def split(per_class):
      y = np.repeat(np.arange(10), per_class)
      x = patterns[y] * 0.6 + rng.uniform(0, 0.4, size=(len(y),) + shape)
      return (x * 255).astype(np.uint8), y
    x_train, y_train = split(6)
    x_test, y_test = split(2)
    path = folder / f'smoke_{name}.npz'
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    paths[name] = str(path)
  return paths


def _pct(value) -> str:
  return '-' if not isinstance(value, (int, float)) else f'{100 * value:.2f}%'


def _num(value, spec: str = '.3g') -> str:
  return '-' if not isinstance(value, (int, float)) else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
  """The suite's results as Markdown: environment line, kernel table, distillation table."""
  parts = report['parts']
  env = parts['environment'].get('result', {})
  lines = [f"# GPU suite{' (smoke)' if report['smoke'] else ''}", '',
           f"{env.get('device_kind', '?')} ({env.get('backend', '?')}), JAX {env.get('jax', '?')}, "
           f"jaxlib {env.get('jaxlib', '?')}, CUDA {env.get('cuda') or '-'}, "
           f"Python {env.get('python', '?')}; fp32 peak "
           f"{_num(env.get('peak_fp32_flops'), '.3g') if env.get('peak_fp32_flops') != 'unknown' else 'unknown'} FLOP/s; "
           f"suite {report['wall_s']:.0f} s.", '',
           '| part | status | wall s | limit s | note |', '|---|---|---:|---:|---|']
  for name in PARTS:
    p = parts[name]
    lines.append(f"| {name} | {p['status']} | {p.get('wall_s', '-')} | {p.get('limit_s', '-')} "
                 f"| {(p.get('error') or '')[:120]} |")
  kernel = parts['kernel'].get('result', {})
  lines += ['', f"Kernel (ConvNet depth {report['settings']['depth']}, float32); measured fp32 matmul "
                f"{_num(kernel.get('measured_matmul_fp32_gflops'), '.4g')} GFLOP/s", '',
            '| size | call | tile | pairs/s | GFLOP/s | % peak | % matmul |',
            '|---|---|---:|---:|---:|---:|---:|']
  for key, entry in kernel.get('sizes', {}).items():
    for label, name in (('forward, auto tile', 'auto_forward'), ('vjp, auto tile', 'auto_vjp'),
                        ('forward, largest tile', 'largest_forward'),
                        ('vjp, largest tile', 'largest_vjp')):
      m = entry.get(name)
      if not m:
        continue
      tile = m.get('tile', m.get('tile_used'))
      tile = 'x'.join(map(str, tile)) if isinstance(tile, list) else tile
      lines.append(f"| {key} | {label} | {tile if tile is not None else 'auto'} | "
                   f"{_num(m['pairs_per_s'], '.4g')} | {_num(m['achieved_flops'] / 1e9, '.4g')} | "
                   f"{_num(m.get('percent_of_peak'), '.2f')} | "
                   f"{_num(m.get('percent_of_matmul'), '.2f')} |")
  ls, kip, rcig = (parts[n].get('result', {}) for n in ('ls', 'kip', 'rcig'))
  lines += ['', '| distillation | result | paper | details |', '|---|---:|---:|---|',
            f"| LS ConvNet CIFAR-10, {report['settings']['ls_ipc']} img/class | "
            f"{_pct(ls.get('krr_test_accuracy'))} | {_pct(PAPER['ls'])} | "
            f"{ls.get('targets', '-')} targets, {ls.get('test_images', '-')} test images, "
            f"{_num(ls.get('pairs_per_s'), '.4g')} pairs/s |",
            f"| KIP ConvNet CIFAR-10, 1 img/class | {_pct(kip.get('krr_test_accuracy'))} | "
            f"{_pct(PAPER['kip'])} | {kip.get('steps', '-')} steps in {kip.get('budget_s', '-')} s "
            f"(batch {kip.get('target_batch', '-')}, {_num(kip.get('steps_per_s'))} steps/s), "
            f"{kip.get('test_images', '-')} test images |",
            f"| RCIG MNIST 1 img/class | {_num(rcig.get('steps_per_s'))} steps/s | - | "
            f"{rcig.get('steps', '-')} steps, first {_num(rcig.get('first_step_s'))} s |"]
  quality = parts['rcig_mnist'].get('result', {})
  if quality.get('test_accuracy') is not None:
    lines.append(f"| RCIG MNIST 1 img/class from {quality['init_support']} | "
                 f"{_pct(quality['test_accuracy'])} ± {_pct(quality['test_accuracy_std'])} | "
                 f"{_pct(PAPER['rcig_mnist'])} | {quality['steps']} steps "
                 f"({_num(quality.get('steps_per_s'))} steps/s, target batch "
                 f"{quality['config']['target_batch']}), {quality['models']} nets, "
                 f"{quality['test_images']} test images |")
  return '\n'.join(lines) + '\n'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              epilog=__doc__.split('\n\n', 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data-dir', default='../shared/data',
                 help='holds mnist/ (idx files) and CIFAR-10 (cifar10-jpg.tar.gz or the '
                      'python tarball)')
  p.add_argument('--smoke', action='store_true',
                 help='every part at tiny sizes on synthetic data (a CPU, under two minutes)')
  p.add_argument('--kip-seconds', type=float, default=90.0,
                 help='KIP: distillation time budget before the final evaluation')
  p.add_argument('--ls-targets', type=int, default=None,
                 help='LS: class-balanced target images; default: the whole train split '
                      '(a rerun that timed out can size this from its kernel_progress)')
  p.add_argument('--total-seconds', type=float, default=590.0,
                 help='the whole suite stops within this (later parts get what is left)')
  p.add_argument('--rcig-mnist-seconds', type=float, default=420.0,
                 help='rcig_mnist: distillation time before its evaluation (the part\'s limit '
                      'is this plus 180 s)')
  p.add_argument('--parts', default=','.join(DEFAULT_PARTS),
                 help='comma list of ' + ', '.join(PARTS))
  p.add_argument('--out', default=str(DEFAULT_OUT),
                 help='the JSON (the .md and rcig_mnist\'s files go beside it)')
  p.add_argument('--compilation-cache', default=None,
                 help='JAX\'s persistent compilation cache, reused by later parts and reruns '
                      '(default: jax_cache beside --out; on a device call name a folder '
                      'outside $OUT, whose files all travel back)')
  p.add_argument('--part', default=None, help=argparse.SUPPRESS)
  p.add_argument('--spec', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.part:
    run_part(args.part, json.loads(args.spec))
    return 0
  wanted = [p.strip() for p in args.parts.split(',') if p.strip()]
  unknown = sorted(set(wanted) - set(PARTS))
  if unknown:
    sys.exit(f'--parts: unknown {unknown}; choose from {", ".join(PARTS)}.')
  if args.smoke:
    args.kip_seconds = min(args.kip_seconds, 6.0)
    args.rcig_mnist_seconds = min(args.rcig_mnist_seconds, 35.0)   # ~15 s of it compiles
  started = time.monotonic()
  part_limits = limits(args)
  run_settings = settings(args.smoke)
  if args.ls_targets is not None:
    run_settings['ls_targets'] = args.ls_targets
  out_dir = Path(args.out).resolve().parent
  with tempfile.TemporaryDirectory(prefix='ntkdd-gpu-suite-') as work_dir:
    spec = {'smoke': args.smoke, 'data_dir': os.path.abspath(args.data_dir),
            'work_dir': work_dir, 'settings': run_settings,
            'kip_seconds': args.kip_seconds, 'rcig_mnist_seconds': args.rcig_mnist_seconds,
            'out_dir': str(out_dir),
            'compilation_cache': args.compilation_cache or str(out_dir / 'jax_cache')}
    spec['pythonpath'] = importable_checkout(Path(work_dir))
    if args.smoke:
      spec['smoke_data'] = write_smoke_data(Path(work_dir))
    parts: dict[str, Any] = {}
    for name in PARTS:
      if name not in wanted:
        parts[name] = {'status': 'not run', 'error': 'not in --parts', 'result': {}}
        continue
      left = args.total_seconds - (time.monotonic() - started)
      limit = min(part_limits[name], left)
      if limit < 5:
        parts[name] = {'status': 'timeout', 'error': 'no time left in --total-seconds',
                       'limit_s': round(max(limit, 0), 1), 'wall_s': 0, 'result': {}}
        continue
      print(f'[gpu_suite] {name}: up to {limit:.0f} s', file=sys.stderr, flush=True)
      parts[name] = launch_part(name, spec, limit)
      print(f"[gpu_suite] {name}: {parts[name]['status']} in {parts[name]['wall_s']} s"
            + (f" ({parts[name]['error'][:300]})" if parts[name].get('error') else ''),
            file=sys.stderr, flush=True)
  report = {'suite': 'gpu_suite', 'smoke': args.smoke,
            'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'wall_s': round(time.monotonic() - started, 1),
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'settings': run_settings,
            'limits_s': part_limits, 'kip_seconds': args.kip_seconds,
            'environment': parts['environment'].get('result', {}),
            'parts': parts}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1, default=_json_default))
  table = markdown(report)
  out.with_suffix('.md').write_text(table)
  print(table)
  print(f'wrote {out} and {out.with_suffix(".md")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
