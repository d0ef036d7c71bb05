"""Our engine on this environment's (current) JAX against neural-tangents run in .venv-lp.

The KIP ConvNet, depth 3, at the sizes the product runs (28x28x1 and 32x32x3, where the
displacement bands are active): NTK and NNGP values and the vjp of <G, K> with respect to x1.
tests/nt_reference.py computes the float64 reference in a .venv-lp subprocess (jax 0.4.23,
neural-tangents 0.6.4) from inputs written here; this process compares. Without .venv-lp the
tests skip, except in CI (CI=true), where they fail.
"""
import os
import subprocess
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from ntkdd.common import architectures, kernels

TESTS = Path(__file__).resolve().parent
LP_PYTHON = TESTS.parent / '.venv-lp' / 'bin' / 'python'
ARCH = architectures.Architecture('convnet', depth=3)
SHAPES = [(28, 28, 1), (32, 32, 3)]
N1, N2 = 3, 2      # a partial tile of 2 rows: padding is exercised too
# max |ours - reference| / max |reference|, measured (jax 0.10.2 against 0.4.23): at most
# 4.5e-16 in float64 and 2.0e-7 in float32. float64's bound, 100x that, fails an engine that
# computes any part in float32.
TOLERANCES = {'float64': 1e-13, 'float32': 1e-4}
# float64 at both sizes; float32 (the product's dtype) at one: each pair costs ~15 s of CPU,
# nearly all compiling, and the suite is run often.
CASES = [((28, 28, 1), 'float64'), ((32, 32, 3), 'float64'), ((32, 32, 3), 'float32')]
REFERENCE_TIMEOUT_S = 900   # ~40 s of CPU; a loaded machine stretches it


def _in_ci() -> bool:
  return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


def _lp_python() -> Path:
  if LP_PYTHON.exists():
    return LP_PYTHON
  message = f'{LP_PYTHON} is missing; build it with `make venv-lp`.'
  if _in_ci():
    pytest.fail(f'{message} CI (CI=true) runs this test.')
  pytest.skip(message)


def _inputs(shape: tuple) -> dict:
  """Fixed inputs of a shape: seeded by the shape, the same in every process."""
  rng = np.random.default_rng(zlib.crc32(repr(('cross-env', shape)).encode()))
  return {'x1': rng.normal(size=(N1,) + shape), 'x2': rng.normal(size=(N2,) + shape),
          'g_ntk': rng.normal(size=(N1, N2)), 'g_nngp': rng.normal(size=(N1, N2))}


def _start_reference(python: Path, work: Path) -> tuple:
  """Starts the .venv-lp subprocess computing every shape's reference; (process, outputs)."""
  outputs, paths = {}, []
  for shape in SHAPES:
    stem = work / 'x'.join(map(str, shape))
    np.savez(f'{stem}_in.npz', arch=np.asarray(ARCH.name), depth=ARCH.depth, w_std=ARCH.w_std,
             b_std=ARCH.b_std, **_inputs(shape))
    outputs[shape] = f'{stem}_out.npz'
    paths += [f'{stem}_in.npz', outputs[shape]]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)
  process = subprocess.Popen([str(python), str(TESTS / 'nt_reference.py')] + paths, env=env,
                             cwd=str(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  return process, outputs


def _ours(shape: tuple, dtype: str) -> dict:
  """Our engine's NTK, NNGP and vjp, with JAX's float64 mode on for float64 only (float32 runs
  as the product does)."""
  inputs = _inputs(shape)
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', dtype == 'float64')
  try:
    values = kernels.compute_kernel(ARCH, inputs['x1'], inputs['x2'], tile=2, dtype=dtype)
    vjp = kernels.kernel_vjp(ARCH, inputs['x1'], inputs['x2'], inputs['g_ntk'],
                             inputs['g_nngp'], tile=2, dtype=dtype)
  finally:
    jax.config.update('jax_enable_x64', previous)
  return dict(values, vjp=vjp)


@pytest.fixture(scope='module')
def results(tmp_path_factory) -> dict:
  """{(shape, dtype): (ours, reference)}. Ours are computed (mostly compiling) while the
  reference subprocess runs."""
  process, outputs = _start_reference(_lp_python(), tmp_path_factory.mktemp('nt_reference'))
  try:
    ours = {(shape, dtype): _ours(shape, dtype) for shape, dtype in CASES}
    log, _ = process.communicate(timeout=REFERENCE_TIMEOUT_S)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 0, f'tests/nt_reference.py failed in .venv-lp:\n{log[-6000:]}'
  references = {}
  for shape, path in outputs.items():
    with np.load(path) as f:
      references[shape] = {k: f[k] for k in f.files}
  return {key: (value, references[key[0]]) for key, value in ours.items()}


def _rel(ours, reference) -> float:
  assert np.all(np.isfinite(ours))
  return float(np.max(np.abs(np.asarray(ours, np.float64) - reference))
               / np.max(np.abs(reference)))


@pytest.mark.parametrize('shape,dtype', CASES,
                         ids=[f'{"x".join(map(str, s))}-{d}' for s, d in CASES])
@pytest.mark.parametrize('name', ['ntk', 'nngp', 'vjp'])
def test_matches_neural_tangents(results, name, shape, dtype):
  ours, reference = results[shape, dtype]
  assert ours[name].dtype == np.dtype(dtype) and reference[name].dtype == np.float64
  error, tol = _rel(ours[name], reference[name]), TOLERANCES[dtype]
  assert error <= tol, f'{name} {shape} {dtype}: relative error {error:.3g} > {tol:g}'
