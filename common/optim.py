"""KIP's support optimiser: optax's Adam in float64 on a checkpointable dict of numpy arrays."""
from __future__ import annotations

import math
from types import ModuleType
from typing import Callable, NamedTuple, Union

import numpy as np

from ntkdd.common import optional

Schedule = Callable[[int], float]

# The Launchpad environment pins optax; the generic `pip install optax` would not fit its JAX.
LAUNCHPAD_OPTAX = ('In the Launchpad environment (Python 3.10, JAX 0.4.23): pip install '
                   'optax==0.1.7 chex==0.1.86 -c constraints/launchpad.txt, which `make venv-lp` '
                   'does.')


def require_optax(needed_for: str) -> ModuleType:
  """Imports optax, or raises one ImportError line saying what needs it and how to install it.

  Args:
    needed_for: what needs optax, as the start of a sentence ("KIP's Adam").

  Returns:
    The optax module.
  """
  try:
    return optional.require('optax', needed_for, 'train')
  except ImportError as e:
    raise ImportError(f'{e} {LAUNCHPAD_OPTAX}') from e


class GradientTransformation(NamedTuple):
  """An (init, update) pair whose state is a flat dict of numpy arrays (one `.npz` checkpoint).

  init(params) -> state; update(grads, state, params) -> (new_params, new_state).
  """
  init: Callable[[dict], dict]
  update: Callable[[dict, dict, dict], tuple]


def constant_schedule(value: float) -> Schedule:
  return lambda step: value


def cosine_schedule(peak: float, total_steps: int, final_fraction: float = 0.0) -> Schedule:
  """peak * (f + (1 - f) * (1 + cos(pi * step / total)) / 2): decays to f * peak at the end."""
  def schedule(step: int) -> float:
    progress = min(step, total_steps) / max(total_steps, 1)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
  return schedule


def _enable_x64():
  """JAX's float64 context: `jax.enable_x64` (new JAX), `jax.experimental.enable_x64` (0.4.x)."""
  import jax  # pylint: disable=import-outside-toplevel
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax import experimental  # pylint: disable=import-outside-toplevel
  return experimental.enable_x64()


def adam(learning_rate: Union[float, Schedule], b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> GradientTransformation:
  """optax's Adam on a dict of numpy arrays, its moments kept in float64.

  Each update runs `optax.adam` with JAX's float64 enabled on float64 copies of the gradients
  and moments; the new parameters keep their own dtype. The state is a flat dict of numpy
  arrays, `count`, `mu/<name>` and `nu/<name>` per parameter, so that it checkpoints as one
  `.npz` (and checkpoints of the earlier numpy Adam, which used these names, resume).
  Parameters left out of `grads` are frozen: neither they nor their moments move.

  Args:
    learning_rate: a rate > 0, or a schedule `step -> rate` (step counts from 0).
    b1, b2, eps: Adam's decay rates and denominator offset.

  Returns:
    A `GradientTransformation`; optax is imported on the first `init`/`update` (see
    `require_optax`).
  """
  schedule = learning_rate if callable(learning_rate) else constant_schedule(learning_rate)
  if not schedule(0) > 0:
    raise ValueError(f'The learning rate must be > 0, got {schedule(0)}.')
  # optax calls the schedule with its step count as a JAX integer; ours takes a Python int.
  rate = (lambda count: schedule(int(count))) if callable(learning_rate) else learning_rate

  def init(params: dict) -> dict:
    state = {'count': np.zeros((), np.int64)}
    for name, value in params.items():
      state[f'mu/{name}'] = np.zeros_like(value, np.float64)
      state[f'nu/{name}'] = np.zeros_like(value, np.float64)
    return state

  def update(grads: dict, state: dict, params: dict):
    optax = require_optax("KIP's Adam")
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    names = list(grads)
    new_state, new_params = dict(state), dict(params)
    with _enable_x64():
      as64 = lambda arrays: {name: jnp.asarray(arrays[name], jnp.float64) for name in names}
      transform = optax.adam(rate, b1=b1, b2=b2, eps=eps)
      count = jnp.asarray(int(state['count']), jnp.int32)
      mu = as64({n: state[f'mu/{n}'] for n in names})
      nu = as64({n: state[f'nu/{n}'] for n in names})
      opt_state = tuple(_with_saved(part, optax, count, mu, nu)
                        for part in transform.init(as64(params)))
      updates, opt_state = transform.update(as64(grads), opt_state)
      adam_state = next(s for s in opt_state if isinstance(s, optax.ScaleByAdamState))
      for name in names:
        new_params[name] = (np.asarray(params[name], np.float64) +
                            np.asarray(updates[name])).astype(params[name].dtype)
        new_state[f'mu/{name}'] = np.asarray(adam_state.mu[name])
        new_state[f'nu/{name}'] = np.asarray(adam_state.nu[name])
      new_state['count'] = np.asarray(int(adam_state.count), np.int64)
    return new_params, new_state

  return GradientTransformation(init, update)


def _with_saved(part, optax: ModuleType, count, mu: dict, nu: dict):
  """One part of `optax.adam`'s chained state with the saved step count and moments."""
  if isinstance(part, optax.ScaleByAdamState):
    return part._replace(count=count, mu=mu, nu=nu)
  if isinstance(part, optax.ScaleByScheduleState):
    return part._replace(count=count)
  return part
