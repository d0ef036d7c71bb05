"""neural-tangents' kernels of our architectures: the reference our engine is tested against.

Needs neural-tangents, so it runs in .venv-lp: tests/test_reference_nt.py imports it there, and
tests/test_reference_cross_env.py (in .venv) runs it there as a script:

  .venv-lp/bin/python tests/nt_reference.py INPUT.npz OUTPUT.npz [INPUT.npz OUTPUT.npz ...]

Each INPUT holds the architecture (`arch`, `depth`, `w_std`, `b_std`), the images `x1`, `x2` and
the cotangents `g_ntk`, `g_nngp`; its OUTPUT gets the float64 `ntk`, `nngp` (K(x1, x2)) and `vjp`
(d/dx1 of <g_ntk, NTK> + <g_nngp, NNGP>), and the `jax_version` and `nt_version` that made them.
This file uses neither ntkdd nor its tests' helpers: the reference stays independent of the engine.
"""
import sys

import jax
import numpy as np
from neural_tangents import stax as nt_stax


def nt_kernel_fn(name: str, depth: int, w_std: float, b_std: float):
  """neural-tangents' kernel_fn of ntkdd's `Architecture(name, depth, w_std, b_std)`."""
  if name == 'convnet':
    layers = [nt_stax.Conv(1, (3, 3), (1, 1), 'SAME', W_std=w_std, b_std=b_std), nt_stax.Relu()]
    for _ in range(depth):
      layers += [nt_stax.Conv(1, (3, 3), (1, 1), 'SAME', W_std=w_std, b_std=b_std),
                 nt_stax.Relu(), nt_stax.AvgPool((2, 2), (2, 2))]
    layers += [nt_stax.Flatten(), nt_stax.Dense(1, w_std, b_std)]
  elif name == 'fc':
    layers = [nt_stax.Flatten()]
    for _ in range(depth):
      layers += [nt_stax.Dense(1, w_std, b_std), nt_stax.Relu()]
    layers += [nt_stax.Dense(1, w_std, b_std)]
  else:
    raise ValueError(f'No neural-tangents reference for architecture {name!r}.')
  return nt_stax.serial(*layers)[2]


def nt_vjp(kernel_fn, x1, x2, g_ntk, g_nngp) -> np.ndarray:
  """d/dx1 of <g_ntk, NTK(x1, x2)> + <g_nngp, NNGP(x1, x2)> by jax.grad through `kernel_fn`."""

  def inner(a):
    k = kernel_fn(a, x2, ('ntk', 'nngp'))
    return (k.ntk * g_ntk).sum() + (k.nngp * g_nngp).sum()

  return np.asarray(jax.grad(inner)(x1))


def write_reference(input_path: str, output_path: str) -> None:
  """The float64 reference of one INPUT.npz (see the module docstring) into OUTPUT.npz."""
  import neural_tangents
  with np.load(input_path) as f:
    case = {k: f[k] for k in f.files}
  kernel_fn = nt_kernel_fn(str(case['arch']), int(case['depth']), float(case['w_std']),
                           float(case['b_std']))
  x1, x2 = (np.asarray(case[k], np.float64) for k in ('x1', 'x2'))
  kernels = kernel_fn(x1, x2, ('ntk', 'nngp'))
  vjp = nt_vjp(kernel_fn, x1, x2, np.asarray(case['g_ntk'], np.float64),
               np.asarray(case['g_nngp'], np.float64))
  np.savez(output_path, ntk=np.asarray(kernels.ntk, np.float64),
           nngp=np.asarray(kernels.nngp, np.float64), vjp=np.asarray(vjp, np.float64),
           jax_version=np.asarray(jax.__version__), nt_version=np.asarray(neural_tangents.__version__))


def main(argv: list) -> int:
  if len(argv) < 2 or len(argv) % 2:
    print(__doc__, file=sys.stderr)
    return 2
  jax.config.update('jax_enable_x64', True)   # before any array is made
  for input_path, output_path in zip(argv[::2], argv[1::2]):
    write_reference(input_path, output_path)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
