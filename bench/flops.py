"""Owns the analytic FLOP and byte count of the ConvNet NTK+NNGP kernel, and this machine's matmul peak and copy bandwidth."""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np

# Conventions (FLOP-equivalents per element). An add, multiply or compare is 1 FLOP. A sqrt and
# an atan2 are counted as TRANSCENDENTAL_FLOPS each, roughly their cost in fused multiply-adds on
# a vector unit. Change these two constants to re-count under another convention.
TRANSCENDENTAL_FLOPS = 20
SQRT_FLOPS = TRANSCENDENTAL_FLOPS
ATAN2_FLOPS = TRANSCENDENTAL_FLOPS
# Arc-cosine map per element: outer var1*var2 (1), cov^2 (1), prod - cov^2 (1), sqrt, atan2,
# (pi - angle) / (2 pi) (2), sin / (2 pi) (1), derivative * cov (1), add (1).
ARC_COSINE_FLOPS = 8 + SQRT_FLOPS + ATAN2_FLOPS
# A later 3x3 conv acts along covariance diagonals, separably: 2 passes of 3 taps, each pass
# 2 adds + 1 scale (6), then the affine map w^2 K + b^2 (NNGP) or w^2 Theta + K (NTK) (2).
DIAGONAL_CONV_FLOPS = 2 * 3 + 2
# The vjp (forward recompute + pullback) is counted as this many forwards (the usual rule).
VJP_FLOP_FACTOR = 3


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Cost of one kernel layer: `cross` for one pair (x1_a, x2_b), `self_` for one image.

  The self-covariances cov1, cov2 are computed once per image of a tile, so a square tile of
  side t adds self_ * 2 / t to every pair.
  """
  name: str
  pixels: int  # P_l, pixels of the layer's input feature map (the covariance is P_l x P_l).
  cross_flops: float
  cross_bytes: float
  self_flops: float
  self_bytes: float

  def per_pair_flops(self, tile: Optional[int] = None) -> float:
    return self.cross_flops + (2.0 / tile * self.self_flops if tile else 0.0)

  def per_pair_bytes(self, tile: Optional[int] = None) -> float:
    return self.cross_bytes + (2.0 / tile * self.self_bytes if tile else 0.0)


def band_radii(height: int, width: int, depth: int) -> tuple[Optional[int], Optional[int]]:
  """Displacement radii at full resolution of the cross and the self pass, None where the full
  covariance is kept: what ntkdd.common.kernels.band_radii picks for this ConvNet (the readout
  sees displacement 0 and each 2x2 pool below it widens the band to 2r + 1; the self pass
  needs only the ReLU variances, one pool less)."""
  pixels = height * width

  def chosen(radius):
    return radius if 2 * (2 * radius + 1) ** 2 <= pixels else None

  return chosen(2 ** depth - 1), chosen(2 ** max(depth - 1, 0) - 1)


def _entries(h: int, w: int, radius: Optional[int], level: int) -> float:
  """Covariance entries of one pass at pooling level `level` (full: P^2; band: P (2r+1)^2;
  0 where a band has nothing left to carry)."""
  if radius is None:
    return float(h * w) ** 2
  r = (radius + 1) // 2 ** level - 1
  return 0.0 if r < 0 else float(h * w * (2 * r + 1) ** 2)


def layer_costs(height: int, width: int, channels: int, depth: int = 3,
                itemsize: int = 4, band: bool = True) -> list[LayerCost]:
  """Per-layer FLOPs and bytes of the ConvNet kernel (conv, relu, `depth` x [conv, relu, pool],
  trace), on displacement bands where the engine uses them (band=False: full covariances
  throughout). Bytes: every pass reads its input tensors and writes its outputs once
  (entries x itemsize per tensor), with no fusion across passes."""
  costs = []
  pixels = height * width
  full = float(pixels) ** 2
  cross_r, self_r = band_radii(height, width, depth) if band else (None, None)

  def first_conv(entries, banded):
    # Inner products of 3x3xC patches (+ scale, + bias); NTK aliases NNGP (1 write). On a
    # band: the full Gram matrix as one product, then the band gathered out of it and masked.
    if not banded:
      return (2 * 9 * channels + 2) * entries, entries * itemsize
    return 2 * 9 * channels * full + 3 * entries, (full + 2 * entries) * itemsize

  cross, self_ = _entries(height, width, cross_r, 0), _entries(height, width, self_r, 0)
  costs.append(LayerCost('conv0 (patch inner product)', pixels,
                         *first_conv(cross, cross_r is not None),
                         *first_conv(self_, self_r is not None)))
  costs.append(_relu_cost('relu0', pixels, itemsize, cross, self_))
  h, w = height, width
  for block in range(1, depth + 1):
    pixels = h * w
    cross, self_ = _entries(h, w, cross_r, block - 1), _entries(h, w, self_r, block - 1)
    # Two tensors (NNGP, NTK); each of 2 passes reads and writes the whole covariance (a band
    # is masked after: one more multiply).
    cross_per_entry = DIAGONAL_CONV_FLOPS + (cross_r is not None)
    self_per_entry = DIAGONAL_CONV_FLOPS + (self_r is not None)
    costs.append(LayerCost(f'conv{block} (diagonal 3x3)', pixels,
                           2 * cross_per_entry * cross, 2 * 2 * 2 * cross * itemsize,
                           self_per_entry * self_, 2 * 2 * self_ * itemsize))
    costs.append(_relu_cost(f'relu{block}', pixels, itemsize, cross, self_))
    # 2x2 pool: each output entry averages 16 input entries (~1 FLOP per entry read).
    h, w = h // 2, w // 2
    cross_out, self_out = _entries(h, w, cross_r, block), _entries(h, w, self_r, block)
    costs.append(LayerCost(f'pool{block} (2x2 avg)', pixels, 2 * 16 * cross_out,
                           2 * 17 * cross_out * itemsize, 16 * self_out,
                           17 * self_out * itemsize))
  pixels = h * w
  # Flatten: trace of the final covariance (P adds, reads the diagonal), then the dense readout.
  costs.append(LayerCost('trace + readout', pixels, 2 * pixels + 4, 2 * pixels * itemsize,
                         pixels + 2, pixels * itemsize))
  return costs


def _relu_cost(name: str, pixels: int, itemsize: int, cross: float, self_: float) -> LayerCost:
  """Arc-cosine map on the NNGP plus the NTK product; reads and writes NNGP and NTK."""
  return LayerCost(name, pixels, (ARC_COSINE_FLOPS + 1) * cross, 4 * cross * itemsize,
                   ARC_COSINE_FLOPS * self_, 2 * self_ * itemsize)


def flops_per_pair(height: int, width: int, channels: int, depth: int = 3,
                   tile: Optional[int] = None, band: bool = True) -> float:
  """Forward (NTK + NNGP) FLOPs per pair; with `tile`, self-covariances amortised over it."""
  return sum(c.per_pair_flops(tile)
             for c in layer_costs(height, width, channels, depth, band=band))


def bytes_per_pair(height: int, width: int, channels: int, depth: int = 3,
                   itemsize: int = 4, tile: Optional[int] = None, band: bool = True) -> float:
  """Forward bytes moved per pair under the one-read-one-write-per-pass model."""
  return sum(c.per_pair_bytes(tile)
             for c in layer_costs(height, width, channels, depth, itemsize, band))


def floor_pairs_per_second(flops: float, bytes_moved: float, peak_gflops: float,
                           bandwidth_gbs: float) -> dict[str, float]:
  """Upper bounds on pairs/s: compute-bound (at the matmul peak) and memory-bound."""
  compute = peak_gflops * 1e9 / flops
  memory = bandwidth_gbs * 1e9 / bytes_moved
  return {'compute_bound_pairs_per_s': compute, 'memory_bound_pairs_per_s': memory,
          'bound_pairs_per_s': min(compute, memory)}


def measure_matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
  """Best float32 numpy matmul rate (GFLOP/s) of `repeats` size x size products."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  a @ b  # Warm the BLAS threads.
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e9


def measure_copy_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
  """Best np.copyto rate (GB/s), counting the read and the write of each byte."""
  count = megabytes * (1 << 20) // 4
  src = np.ones(count, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # Fault the pages in.
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2.0 * src.nbytes / best / 1e9


def measure_jax_matmul_peak_gflops(size: int = 8192, repeats: int = 5) -> float:
  """Best float32 matmul rate (GFLOP/s) on JAX's default device (precision HIGHEST: no TF32)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  jax.block_until_ready(matmul(a, a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e9


def measure_jax_copy_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
  """Best read+write rate (GB/s) of an elementwise pass on JAX's default device."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(megabytes * (1 << 20) // 4, jnp.float32)
  return 2.0 * x.nbytes / min_seconds(jax.jit(lambda v: v + 1.0), x, repeats) / 1e9


def min_seconds(fn: Callable, arg: Any, rounds: int) -> float:
  """Fastest of `rounds` calls of the JAX function fn(arg) (after one call that compiles it)."""
  import jax
  jax.block_until_ready(fn(arg))
  best = float('inf')
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(arg))
    best = min(best, time.perf_counter() - start)
  return best


def format_table(height: int, width: int, channels: int, depth: int = 3, itemsize: int = 4,
                 peak_gflops: Optional[float] = None,
                 bandwidth_gbs: Optional[float] = None, band: bool = True) -> str:
  """Markdown table of per-layer cross-pair FLOPs and bytes, totals and (optionally) floors."""
  costs = layer_costs(height, width, channels, depth, itemsize, band)
  radii = band_radii(height, width, depth) if band else (None, None)
  how = (f'displacement bands: radius {radii[0]} cross, {radii[1]} self'
         if band and radii != (None, None) else 'full covariances')
  lines = [f'ConvNet kernel {height}x{width}x{channels}, depth {depth}, itemsize {itemsize} '
           f'(per pair, large-tile limit; {how})', '',
           '| layer | P_l | MFLOP | MB moved |', '|---|---:|---:|---:|']
  for c in costs:
    lines.append(f'| {c.name} | {c.pixels} | {c.cross_flops / 1e6:.3f} | '
                 f'{c.cross_bytes / 1e6:.3f} |')
  total_flops = sum(c.cross_flops for c in costs)
  total_bytes = sum(c.cross_bytes for c in costs)
  lines.append(f'| **total** | | **{total_flops / 1e6:.2f}** | **{total_bytes / 1e6:.2f}** |')
  if peak_gflops and bandwidth_gbs:
    floors = floor_pairs_per_second(total_flops, total_bytes, peak_gflops, bandwidth_gbs)
    lines += ['', f'At {peak_gflops:.0f} GFLOP/s and {bandwidth_gbs:.1f} GB/s: '
              f'compute bound {floors["compute_bound_pairs_per_s"]:.0f} pairs/s, '
              f'memory bound {floors["memory_bound_pairs_per_s"]:.0f} pairs/s.']
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--sizes', default='8x8x3,16x16x3,28x28x1,32x32x3',
                      help='comma-separated HxWxC image shapes')
  parser.add_argument('--depth', type=int, default=3, help='number of [conv, relu, pool] blocks')
  parser.add_argument('--itemsize', type=int, default=4, help='bytes per element (4: float32)')
  parser.add_argument('--full', action='store_true',
                      help='count full pixel-pixel covariances (neural-tangents\' algorithm and '
                           'ours before displacement bands) instead of the bands ours uses')
  parser.add_argument('--measure', action='store_true',
                      help='measure this machine\'s matmul peak and copy bandwidth for the floors')
  args = parser.parse_args()
  peak = bandwidth = None
  if args.measure:
    peak, bandwidth = measure_matmul_peak_gflops(), measure_copy_bandwidth_gbs()
    print(f'float32 matmul peak {peak:.1f} GFLOP/s, copy bandwidth {bandwidth:.1f} GB/s\n')
  for size in args.sizes.split(','):
    h, w, c = (int(v) for v in size.lower().split('x'))
    print(format_table(h, w, c, args.depth, args.itemsize, peak, bandwidth,
                       band=not args.full), end='\n\n')


if __name__ == '__main__':
  main()
