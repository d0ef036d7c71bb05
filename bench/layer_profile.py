"""Owns the per-layer profile of the ConvNet kernel: one pair's cross pass, forward and gradient, timed up to each layer.

Where the kernel's time goes, layer by layer, on whatever JAX the interpreter has: the split
path's cross pass for ONE pair (the inner loop of `kernels.compute_kernel`, at the whole
network's displacement band), its self-pass variances computed once beforehand, is jitted up to
each layer in turn (the sum of the NTK and NNGP computed so far) and timed, forward and the
gradient with respect to the first image (what `kernel_vjp` computes per pair, its
rematerialised forward included). Times are cumulative: a prefix's minimum over --rounds
calls. Differences between neighbouring rows are the layers' costs only roughly (XLA drops
what a prefix does not read), so compare a row across environments, not rows within one.

  taskset -c 0 .venv/bin/python bench/layer_profile.py --size 28x28x1          # current JAX
  taskset -c 0 .venv-lp/bin/python bench/layer_profile.py --size 28x28x1       # JAX 0.4.23

Pin it to one core; run the two environments one after the other on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import min_seconds  # noqa: E402  (bench/flops.py)
from kernel_throughput import environment, env_name, write_json  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--size', default='28x28x1', help='image shape HxWxC')
  parser.add_argument('--depth', type=int, default=3, help='ConvNet depth')
  parser.add_argument('--rounds', type=int, default=30, help='timed calls per prefix (min)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None,
                      help='default bench/results/layer_profile_<environment>.json')
  return parser.parse_args(argv)


def layer_name(layer: Any) -> str:
  """'Conv', 'Relu', ...: the factory a layer's kernel_fn was made in."""
  return layer.kernel_fn.__qualname__.split('.')[0]


def prefix_functions(image_shape: tuple, depth: int, seed: int) -> tuple[list, list, tuple]:
  """(layer names, one function per prefix: first image -> sum of the pair's NTK and NNGP
  after that prefix, the pair (x1, x2)): the cross pass of one random pair."""
  import jax.numpy as jnp
  from ntkdd.common import architectures, kernels, stax
  layers = architectures.layers(kernels._ntk_parameterized(   # as kernels.kernel_fn builds it
      architectures.Architecture(name='convnet', depth=depth)))
  whole = stax.serial(*layers)
  cross_band, self_band = kernels.band_radii(whole, image_shape[:2])
  rng = np.random.default_rng(seed)
  x1, x2 = (jnp.asarray(rng.standard_normal((1,) + image_shape), jnp.float32) for _ in (0, 1))
  given = tuple(zip(kernels._self_variances(whole, x1, self_band),
                    kernels._self_variances(whole, x2, self_band)))

  def cross(prefix: tuple) -> Callable:
    def total(a):
      k = stax.inputs_to_kernel(a, x2, 'cross', given, band=cross_band)
      for layer in prefix:
        k = layer.kernel_fn(k)
      return sum(jnp.sum(part) for part in (k.ntk, k.nngp) if part is not None)
    return total

  return ([layer_name(layer) for layer in layers],
          [cross(tuple(layers[:count])) for count in range(1, len(layers) + 1)], (x1, x2))


def profile(image_shape: tuple, depth: int, rounds: int, seed: int) -> list[dict]:
  """Cumulative forward and gradient seconds of one pair's cross pass, per layer prefix."""
  import jax
  names, functions, (x1, _) = prefix_functions(image_shape, depth, seed)
  return [{'layer': name, 'index': i,
           'forward_ms': 1e3 * min_seconds(jax.jit(fn), x1, rounds),
           'gradient_ms': 1e3 * min_seconds(jax.jit(jax.grad(fn)), x1, rounds)}
          for i, (name, fn) in enumerate(zip(names, functions))]


def main(argv: Optional[list[str]] = None) -> dict:
  args = parse_args(argv)
  image_shape = tuple(int(s) for s in args.size.split('x'))
  if len(image_shape) != 3:
    raise SystemExit(f'--size must be HxWxC, got {args.size!r}.')
  env = environment()
  rows = profile(image_shape, args.depth, args.rounds, args.seed)
  print(f"ConvNet depth {args.depth}, {args.size}, one pair's cross pass, cumulative ms "
        f"(jax {env['jax']}, min of {args.rounds})")
  print(f"{'#':>2} {'layer':8} {'forward':>9} {'gradient':>9}")
  for row in rows:
    print(f"{row['index']:>2} {row['layer']:8} {row['forward_ms']:9.3f} {row['gradient_ms']:9.3f}")
  report = {'environment': env, 'size': args.size, 'depth': args.depth,
            'rounds': args.rounds, 'rows': rows}
  write_json(report, args.json, f'layer_profile_{env_name(env)}.json')
  return report


if __name__ == '__main__':
  main()
