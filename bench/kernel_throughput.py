"""Owns the ConvNet NTK+NNGP kernel benchmark: compile time, forward and vjp pairs/s, peak memory, ours vs neural-tangents, current vs legacy code.

Each (size, implementation, dtype) runs in its own fresh subprocess, so that peak memory
(ru_maxrss growth on CPU, peak_bytes_in_use on an accelerator) belongs to one configuration
and float64 (jax_enable_x64) never leaks into a float32 run. --compare-legacy instead times
compute_kernel / kernel_vjp at the shapes runs use, the current code against legacy=True,
taking turns in one process.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402  (bench/flops.py, next to this file)

WORKER_MARKER = 'KERNEL_THROUGHPUT_RESULT '
DEFAULT_SIZES = '8x8x3,16x16x3,28x28x1,32x32x3'


# ----------------------------------------------------------------------------------------------
# Flags.

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description='Throughput of the ConvNet NTK+NNGP kernel tile functions of ntkdd '
                  '(ntkdd.common.kernels.tile_fn / tile_vjp_fn), and of neural-tangents when '
                  'it is importable (float32 and float64; ratios are against its faster one).',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--sizes', default=DEFAULT_SIZES,
                      help='comma-separated HxWxC image shapes')
  parser.add_argument('--depth', type=int, default=3,
                      help='ConvNet depth: number of [conv, relu, 2x2 pool] blocks')
  parser.add_argument('--seconds', type=float, default=3.0,
                      help='time budget of each measurement (at least one timed call)')
  parser.add_argument('--dtypes', default='float32',
                      help='comma-separated dtypes for ours (float32, float64)')
  parser.add_argument('--tile', type=int, default=None,
                      help='square tile side for ours (pairs per call = tile^2); default: '
                           'kernels.auto_tile(..., vjp=True), the tile kernel_vjp would use')
  parser.add_argument('--nt-tile', type=int, default=None,
                      help='tile side for neural-tangents (ours is also timed at it for the '
                           'ratio); default: min(tile, max(2, 1024 // pixels))')
  parser.add_argument('--nt-seconds', type=float, default=None,
                      help='time budget of each neural-tangents measurement; default --seconds')
  parser.add_argument('--skip-nt', action='store_true',
                      help='do not benchmark neural-tangents even if it is importable')
  parser.add_argument('--json', default=None,
                      help='where to write the results; default '
                           'bench/results/kernel_throughput_<env>.json')
  parser.add_argument('--no-peak', action='store_true',
                      help='skip measuring the matmul peak and copy bandwidth (no %% of peak)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the random inputs')
  parser.add_argument('--compare-legacy', action='store_true',
                      help='instead of the tile table: time the blocked entry points '
                           'compute_kernel / kernel_vjp on --problems, the current code against '
                           'legacy=True (previous formulation and tiling), alternately in this '
                           'one process, and print their ratios (first size of --sizes)')
  parser.add_argument('--problems', default='10x100,10,8x8',
                      help='with --compare-legacy: comma-separated problems, RxC for K(R rows, '
                           'C columns) and its vjp, or N for the symmetric K(x, x) (forward only)')
  parser.add_argument('--rounds', type=int, default=3,
                      help='with --compare-legacy: alternating timed rounds (median reported)')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def parse_size(text: str) -> tuple[int, int, int]:
  parts = [int(v) for v in text.lower().split('x')]
  if len(parts) != 3 or min(parts) < 1:
    raise SystemExit(f'--sizes: expected HxWxC like 32x32x3, got {text!r}')
  return parts[0], parts[1], parts[2]


# ----------------------------------------------------------------------------------------------
# Worker: one (implementation, size, dtype) in a fresh process.

def reset_peak_rss() -> bool:
  """Resets the process's peak-RSS mark (VmHWM) to its current RSS, where Linux allows it."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """Process peak resident set size: VmHWM (resettable) on Linux, else ru_maxrss."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024  # KiB on Linux, bytes on macOS.


def device_peak_bytes() -> Optional[int]:
  """Accelerator peak bytes in use, where the backend reports it (not on CPU)."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # CPU devices have no memory_stats.
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def ours_functions(depth: int) -> tuple[Callable, Callable]:
  """(forward, vjp) jitted tile functions of ntkdd."""
  from ntkdd.common import architectures, kernels
  arch = architectures.Architecture(name='convnet', depth=depth)
  return kernels.tile_fn(arch), kernels.tile_vjp_fn(arch)


def nt_functions(depth: int) -> tuple[Callable, Callable]:
  """(forward, vjp) jitted neural-tangents functions of the same ConvNet kernel."""
  from ntkdd.common import architectures
  import nt_kernels  # bench/nt_kernels.py, next to this file (needs neural-tangents)
  return nt_kernels.nt_tile_functions(architectures.Architecture(name='convnet', depth=depth))


def tile_inputs(tile: int, size: tuple[int, int, int], dtype: str, seed: int) -> dict:
  """Identical random inputs for every implementation: x1, x2 images and cotangents."""
  rng = np.random.RandomState(seed)
  h, w, c = size
  return {'x1': rng.standard_normal((tile, h, w, c)).astype(dtype),
          'x2': rng.standard_normal((tile, h, w, c)).astype(dtype),
          'g_ntk': rng.standard_normal((tile, tile)).astype(dtype),
          'g_nngp': rng.standard_normal((tile, tile)).astype(dtype)}


def compile_timed(fn: Callable, args: tuple) -> tuple[Callable, float]:
  """AOT-compiles a jitted function for `args`; returns the executable and lower+compile time."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_calls(fn: Callable, args: tuple, seconds: float) -> dict[str, float]:
  """One untimed warm-up call, then timed calls until `seconds` have passed (at least one)."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while not times or time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  leaves = out if isinstance(out, tuple) else (out,)
  finite = all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in leaves)
  return {'calls': len(times), 'median_s': float(np.median(times)),
          'best_s': float(np.min(times)), 'finite': finite}


def peak_growth_mb(action: Callable[[], Any]) -> tuple[Any, float, bool]:
  """Runs `action`; returns its result, the growth of peak RSS over the RSS before it (MB), and
  whether the peak mark could be reset first (if not, earlier peaks can hide this one)."""
  was_reset = reset_peak_rss()
  before = peak_rss_bytes()
  result = action()
  return result, (peak_rss_bytes() - before) / 1e6, was_reset


def measure_tile(forward: Callable, vjp: Callable, tile: int, spec: dict) -> dict[str, Any]:
  """Compile times, call times and peak-memory growth (compile and run apart) at one tile."""
  import jax.numpy as jnp
  data = {k: jnp.asarray(v) for k, v in
          tile_inputs(tile, tuple(spec['size']), spec['dtype'], spec['seed']).items()}
  pairs = tile * tile
  fwd_args = (data['x1'], data['x2'])
  vjp_args = (data['x1'], data['x2'], data['g_ntk'], data['g_nngp'])
  (fwd_exec, fwd_compile_s), fwd_compile_mb, _ = peak_growth_mb(
      lambda: compile_timed(forward, fwd_args))
  (vjp_exec, vjp_compile_s), vjp_compile_mb, _ = peak_growth_mb(
      lambda: compile_timed(vjp, vjp_args))
  fwd, fwd_mb, reset_ok = peak_growth_mb(lambda: time_calls(fwd_exec, fwd_args, spec['seconds']))
  device_fwd = device_peak_bytes()
  bwd, vjp_mb, _ = peak_growth_mb(lambda: time_calls(vjp_exec, vjp_args, spec['seconds']))
  device_vjp = device_peak_bytes()
  return {
      'tile': tile, 'pairs_per_call': pairs,
      'forward': dict(fwd, compile_s=fwd_compile_s, pairs_per_s=pairs / fwd['median_s']),
      'vjp': dict(bwd, compile_s=vjp_compile_s, pairs_per_s=pairs / bwd['median_s']),
      # Peak-RSS growth while running (compiled executables already resident). Without a
      # resettable peak mark (non-Linux) these are high-water marks that include compiling.
      'rss_peak_was_reset': reset_ok,
      'rss_growth_compile_mb': {'forward': fwd_compile_mb, 'vjp': vjp_compile_mb},
      'rss_growth_forward_mb': fwd_mb,
      'rss_growth_vjp_mb': vjp_mb,
      # Accelerator peak bytes in use (whole process, so the vjp one includes the forward's).
      'device_peak_forward_mb': None if device_fwd is None else device_fwd / 1e6,
      'device_peak_vjp_mb': None if device_vjp is None else device_vjp / 1e6,
  }


def run_worker(spec: dict) -> dict[str, Any]:
  """Measures one configuration at each of spec['tiles'] (memory is honest only for the first)."""
  import jax
  if spec['dtype'] == 'float64':
    jax.config.update('jax_enable_x64', True)
  make = nt_functions if spec['impl'] == 'nt' else ours_functions
  forward, vjp = make(spec['depth'])
  return {'spec': spec, 'tiles': [measure_tile(forward, vjp, t, spec) for t in spec['tiles']]}


def launch_worker(spec: dict, timeout_s: float) -> dict[str, Any]:
  """Runs `run_worker(spec)` in a fresh interpreter; returns its result or an error record."""
  command = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {'spec': spec, 'error': f'timed out after {timeout_s:.0f} s'}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(WORKER_MARKER):
      return json.loads(line[len(WORKER_MARKER):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
  return {'spec': spec, 'error': f'exit {proc.returncode}: ' + ' | '.join(tail)}


# ----------------------------------------------------------------------------------------------
# Driver.

def environment() -> dict[str, Any]:
  """Interpreter, JAX and device description for the JSON and the default file name."""
  import jax
  device = jax.devices()[0]
  try:
    usable_cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    usable_cpus = os.cpu_count()
  try:
    import neural_tangents
    nt_version = neural_tangents.__version__
  except Exception:
    nt_version = None
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': getattr(jax.lib, '__version__', None) or _jaxlib_version(),
          'numpy': np.__version__, 'neural_tangents': nt_version,
          'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'platform': platform.platform(),
          'machine': platform.machine(), 'cpu_count': os.cpu_count(),
          'usable_cpus': usable_cpus}


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:
    return None


def env_name(env: dict[str, Any]) -> str:
  major, minor = env['python'].split('.')[:2]
  return f"py{major}{minor}-jax{env['jax']}-{env['backend']}"


def machine_peaks(backend: str) -> dict[str, float]:
  """float32 matmul peak and copy bandwidth of the device the kernel runs on."""
  if backend == 'cpu':
    return {'matmul_gflops': flops.measure_matmul_peak_gflops(),
            'copy_gbs': flops.measure_copy_bandwidth_gbs(), 'measured_with': 'numpy'}
  return {'matmul_gflops': flops.measure_jax_matmul_peak_gflops(),
          'copy_gbs': flops.measure_jax_copy_bandwidth_gbs(), 'measured_with': 'jax'}


def default_tile(size: tuple[int, int, int], depth: int, dtype: str) -> int:
  from ntkdd.common import architectures, kernels
  arch = architectures.Architecture(name='convnet', depth=depth)
  return kernels.auto_tile(arch, size, dtype, vjp=True)


def default_nt_tile(size: tuple[int, int, int], tile: int) -> int:
  """Small enough that one neural-tangents call stays around a second on a CPU."""
  return min(tile, max(2, 1024 // (size[0] * size[1])))


def nt_importable() -> bool:
  try:
    import neural_tangents  # noqa: F401
    return True
  except Exception:
    return False


def add_flop_rates(result: dict[str, Any], size: tuple[int, int, int], depth: int,
                   peaks: Optional[dict[str, float]]) -> None:
  """Adds model FLOPs/pair, achieved GFLOP/s and % of matmul peak to each measured tile."""
  for tile_result in result.get('tiles', []):
    tile = tile_result['tile']
    fwd_flops = flops.flops_per_pair(*size, depth, tile=tile)
    tile_result['model_flops_per_pair'] = {'forward': fwd_flops,
                                           'vjp': flops.VJP_FLOP_FACTOR * fwd_flops}
    for kind, per_pair in tile_result['model_flops_per_pair'].items():
      rate = tile_result[kind]['pairs_per_s'] * per_pair / 1e9
      tile_result[kind]['gflops'] = rate
      tile_result[kind]['percent_of_matmul_peak'] = (
          100.0 * rate / peaks['matmul_gflops'] if peaks else None)


def run_size(size: tuple[int, int, int], args: argparse.Namespace, with_nt: bool,
             peaks: Optional[dict[str, float]]) -> dict[str, Any]:
  """All workers of one image size: ours per dtype (at tile, and nt's tile), nt f32 and f64."""
  dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
  tile = args.tile or default_tile(size, args.depth, dtypes[0])
  nt_tile = args.nt_tile or default_nt_tile(size, tile)
  base = {'size': list(size), 'depth': args.depth, 'seed': args.seed}
  timeout_s = 600 + 20 * args.seconds
  entry: dict[str, Any] = {'size': 'x'.join(map(str, size)), 'tile': tile,
                           'nt_tile': nt_tile if with_nt else None,
                           'flops_per_pair': flops.flops_per_pair(*size, args.depth),
                           'bytes_per_pair_float32': flops.bytes_per_pair(*size, args.depth),
                           'ours': {}, 'nt': {}}
  for dtype in dtypes:
    tiles = [tile] + ([nt_tile] if with_nt and nt_tile != tile else [])
    spec = dict(base, impl='ours', dtype=dtype, tiles=tiles, seconds=args.seconds)
    print(f'  {entry["size"]}: ours {dtype}, tiles {tiles}', file=sys.stderr, flush=True)
    entry['ours'][dtype] = launch_worker(spec, timeout_s)
    add_flop_rates(entry['ours'][dtype], size, args.depth, peaks)
  if with_nt:
    for dtype in ('float32', 'float64'):
      spec = dict(base, impl='nt', dtype=dtype, tiles=[nt_tile],
                  seconds=args.nt_seconds or args.seconds)
      print(f'  {entry["size"]}: neural-tangents {dtype}, tile {nt_tile}', file=sys.stderr,
            flush=True)
      entry['nt'][dtype] = launch_worker(spec, timeout_s)
    entry['ratios'] = ratios(entry, dtypes[0], nt_tile)
  return entry


def tile_result(result: dict[str, Any], tile: int) -> Optional[dict[str, Any]]:
  for t in result.get('tiles', []):
    if t['tile'] == tile:
      return t
  return None


def ratios(entry: dict[str, Any], ours_dtype: str, nt_tile: int) -> dict[str, Any]:
  """ours / neural-tangents pairs/s at nt's tile, against nt's faster dtype per direction."""
  ours = tile_result(entry['ours'].get(ours_dtype, {}), nt_tile)
  out: dict[str, Any] = {'ours_dtype': ours_dtype, 'tile': nt_tile}
  for kind in ('forward', 'vjp'):
    nt_rates = {d: tile_result(r, nt_tile)[kind]['pairs_per_s']
                for d, r in entry['nt'].items() if tile_result(r, nt_tile)}
    if not ours or not nt_rates:
      out[kind] = None
      continue
    best_dtype = max(nt_rates, key=nt_rates.get)
    out[kind] = {'ours_pairs_per_s': ours[kind]['pairs_per_s'],
                 'nt_best_dtype': best_dtype, 'nt_pairs_per_s': nt_rates[best_dtype],
                 'ours_over_nt': ours[kind]['pairs_per_s'] / nt_rates[best_dtype]}
  return out


# ----------------------------------------------------------------------------------------------
# Printing.

def _fmt(value: Optional[float], spec: str = '.3g') -> str:
  return '-' if value is None else format(value, spec)


def throughput_rows(entry: dict[str, Any]) -> list[list[str]]:
  rows = []
  for impl, by_dtype in (('ours', entry['ours']), ('nt', entry['nt'])):
    for dtype, result in by_dtype.items():
      if 'error' in result:
        rows.append([entry['size'], impl, dtype, '-', 'ERROR: ' + result['error'][:80]])
        continue
      t = result['tiles'][0]
      pairs = t['pairs_per_call']
      memory_mb = t['device_peak_vjp_mb'] or t['rss_growth_vjp_mb']
      fwd_memory_mb = t['device_peak_forward_mb'] or t['rss_growth_forward_mb']
      fwd, bwd = t['forward'], t['vjp']
      rows.append([entry['size'], impl, dtype, str(t['tile']),
                   f"{fwd['compile_s']:.2f}/{bwd['compile_s']:.2f}",
                   _fmt(fwd['pairs_per_s']), _fmt(bwd['pairs_per_s']),
                   f"{fwd_memory_mb / pairs:.3g}/{memory_mb / pairs:.3g}",
                   _fmt(t['model_flops_per_pair']['forward'] / 1e6) if impl == 'ours' else '-',
                   _fmt(fwd.get('gflops')) + '/' + _fmt(bwd.get('gflops')),
                   _fmt(fwd.get('percent_of_matmul_peak'), '.1f') + '/'
                   + _fmt(bwd.get('percent_of_matmul_peak'), '.1f'),
                   '' if fwd['finite'] and bwd['finite'] else 'NON-FINITE'])
  return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row + [''] * (len(header) - len(row))) + ' |' for row in rows]
  return '\n'.join(lines)


def print_report(report: dict[str, Any]) -> None:
  env, peaks = report['env'], report['peaks']
  print(f"\npython {env['python']}, jax {env['jax']}, neural-tangents "
        f"{env['neural_tangents'] or 'not importable'}, {env['backend']} "
        f"({env['device_kind']}), {env['usable_cpus']}/{env['cpu_count']} CPUs usable")
  if peaks:
    print(f"float32 matmul peak {peaks['matmul_gflops']:.1f} GFLOP/s, copy bandwidth "
          f"{peaks['copy_gbs']:.1f} GB/s ({peaks['measured_with']})")
  header = ['size', 'impl', 'dtype', 'tile', 'compile s fwd/vjp', 'fwd pairs/s',
            'vjp pairs/s', 'MB/pair fwd/vjp', 'MFLOP/pair', 'GFLOP/s fwd/vjp',
            '% peak fwd/vjp', 'check']
  rows = [row for entry in report['results'] for row in throughput_rows(entry)]
  print('\n' + markdown_table(header, rows))
  ratio_rows = []
  for entry in report['results']:
    r = entry.get('ratios')
    if not r:
      continue
    cells = [entry['size'], str(r['tile'])]
    for kind in ('forward', 'vjp'):
      k = r[kind]
      cells += (['-'] * 4 if not k else
                [_fmt(k['ours_pairs_per_s']), _fmt(k['nt_pairs_per_s']), k['nt_best_dtype'],
                 f"{k['ours_over_nt']:.2f}x"])
    ratio_rows.append(cells)
  if ratio_rows:
    print('\nours (' + report['results'][0]['ratios']['ours_dtype'] + ') vs neural-tangents '
          '(its faster dtype), same tile and inputs:\n')
    print(markdown_table(['size', 'tile', 'ours fwd', 'nt fwd', 'nt dtype', 'fwd ratio',
                          'ours vjp', 'nt vjp', 'nt dtype', 'vjp ratio'], ratio_rows))


# ----------------------------------------------------------------------------------------------
# Current code against legacy=True, side by side in one process.

def parse_problem(text: str) -> tuple[int, Optional[int]]:
  parts = [int(v) for v in text.lower().split('x')]
  if len(parts) not in (1, 2) or min(parts) < 1:
    raise SystemExit(f'--problems: expected RxC or N, got {text!r}')
  return parts[0], (parts[1] if len(parts) == 2 else None)


def compare_legacy(args: argparse.Namespace) -> dict[str, Any]:
  """Median seconds of compute_kernel and kernel_vjp per problem, legacy and current taking
  turns within each round (same inputs, same process, so load hits both alike)."""
  import jax
  from ntkdd.common import architectures, kernels
  size = parse_size(args.sizes.split(',')[0])
  arch = architectures.Architecture(name='convnet', depth=args.depth)
  rng = np.random.RandomState(args.seed)
  rows = []
  for text in args.problems.split(','):
    n1, n2 = parse_problem(text.strip())
    x1 = rng.standard_normal((n1,) + size).astype('float32')
    x2 = None if n2 is None else rng.standard_normal((n2,) + size).astype('float32')
    cols = n1 if n2 is None else n2
    g = rng.standard_normal((2, n1, cols)).astype('float32')
    calls = {}
    for legacy in (True, False):
      tile = args.tile
      calls[(legacy, 'forward')] = functools.partial(
          kernels.compute_kernel, arch, x1, x2, tile=tile, legacy=legacy)
      if n2 is not None:
        calls[(legacy, 'vjp')] = functools.partial(
            kernels.kernel_vjp, arch, x1, x2, g[0], g[1], tile=tile, legacy=legacy)
    first = {}
    for key, call in calls.items():          # compiles (and the first call) outside the timing
      start = time.perf_counter()
      jax.block_until_ready(call())
      first[key] = time.perf_counter() - start
      print(f'  {text} {"legacy" if key[0] else "current"} {key[1]}: first call '
            f'{first[key]:.1f} s', file=sys.stderr, flush=True)
    times: dict = {key: [] for key in calls}
    for _ in range(args.rounds):
      for key, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        times[key].append(time.perf_counter() - start)
    pairs = n1 * cols
    for kind in ('forward', 'vjp'):
      if (False, kind) not in times:
        continue
      old, new = (float(np.median(times[(legacy, kind)])) for legacy in (True, False))
      rows.append({'problem': text, 'kind': kind, 'pairs': pairs,
                   'legacy_s': old, 'current_s': new,
                   'legacy_pairs_per_s': pairs / old, 'current_pairs_per_s': pairs / new,
                   'speedup': old / new, 'first_call_s': {'legacy': first[(True, kind)],
                                                          'current': first[(False, kind)]},
                   'rounds': args.rounds})
  return {'size': list(size), 'depth': args.depth, 'tile': args.tile, 'rows': rows}


def print_comparison(result: dict[str, Any]) -> None:
  print(f"\n{'x'.join(map(str, result['size']))}, depth {result['depth']}, tile "
        f"{result['tile'] or 'auto'}: legacy=True against the current code, alternating\n")
  print(markdown_table(
      ['problem', 'kind', 'pairs', 'legacy pairs/s', 'current pairs/s', 'speedup'],
      [[r['problem'], r['kind'], str(r['pairs']), _fmt(r['legacy_pairs_per_s']),
        _fmt(r['current_pairs_per_s']), f"{r['speedup']:.2f}x"] for r in result['rows']]))


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  if args.worker:
    print(WORKER_MARKER + json.dumps(run_worker(json.loads(args.worker))), flush=True)
    return
  if args.compare_legacy:
    env = environment()
    result = compare_legacy(args)
    print_comparison(result)
    report = {'config': {k: v for k, v in vars(args).items() if k != 'worker'}, 'env': env,
              'comparison': result}
    write_json(report, args.json, f'kernel_legacy_comparison_{env_name(env)}.json')
    return
  sizes = [parse_size(s) for s in args.sizes.split(',') if s.strip()]
  env = environment()
  with_nt = not args.skip_nt and nt_importable()
  peaks = None if args.no_peak else machine_peaks(env['backend'])
  print(f'benchmarking {len(sizes)} sizes (neural-tangents: {"yes" if with_nt else "no"})',
        file=sys.stderr, flush=True)
  results = [run_size(size, args, with_nt, peaks) for size in sizes]
  report = {'config': {k: v for k, v in vars(args).items() if k != 'worker'},
            'env': env, 'peaks': peaks,
            'flop_conventions': {'transcendental_flops': flops.TRANSCENDENTAL_FLOPS,
                                 'vjp_flop_factor': flops.VJP_FLOP_FACTOR},
            'results': results}
  print_report(report)
  write_json(report, args.json, f'kernel_throughput_{env_name(env)}.json')


def write_json(report: dict[str, Any], path: Optional[str], default_name: str) -> str:
  """Writes `report` to `path`, by default bench/results/<default_name>; returns the path."""
  path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                              default_name)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  print(f'\nwrote {path}')
  return path


if __name__ == '__main__':
  main()
