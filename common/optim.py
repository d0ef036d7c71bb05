"""KIP's support optimiser: optax's Adam in float64 on a checkpointable dict of numpy arrays; the
support's moving average (KIP and RCIG)."""
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


def check_ema_decay(decay: float) -> None:
  """Raises ValueError unless `decay` is a moving average's decay: in [0, 1), 0 meaning off."""
  if not 0 <= decay < 1:
    raise ValueError(f'--ema-decay must be in [0, 1) (0: off), got {decay}.')


def ema_update(average: dict, params: dict, decay: float) -> dict:
  """One step of the exponential moving average of `params` (numpy or JAX arrays).

  The average starts at zeros and is read through `ema_value`, bias-corrected as Adam's moments.
  """
  return {k: decay * average[k] + (1 - decay) * params[k] for k in average}


def ema_value(average, decay: float, steps: int):
  """The bias-corrected average after `steps` `ema_update`s: average / (1 - decay^steps)."""
  return average / (1 - decay ** steps)


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

  Each update runs one jitted `optax.adam` step with JAX's float64 enabled on float64 copies of
  the gradients and moments; the new parameters keep their own dtype. The state is a flat dict
  of numpy arrays, `count`, `mu/<name>` and `nu/<name>` per parameter, so that it checkpoints
  as one `.npz` (and checkpoints of the earlier numpy Adam, which used these names, resume).
  Parameters left out of `grads` are frozen: neither they nor their moments move.

  Args:
    learning_rate: a rate > 0, or a schedule `step -> rate` (step counts from 0).
    b1, b2, eps: Adam's decay rates and denominator offset.

  Returns:
    A `GradientTransformation`; optax is imported on the first update (see `require_optax`).
  """
  schedule = learning_rate if callable(learning_rate) else constant_schedule(learning_rate)
  if not schedule(0) > 0:
    raise ValueError(f'The learning rate must be > 0, got {schedule(0)}.')
  jitted = []   # the jitted optax step, made on the first update

  def init(params: dict) -> dict:
    state = {'count': np.zeros((), np.int64)}
    for name, value in params.items():
      state[f'mu/{name}'] = np.zeros_like(value, np.float64)
      state[f'nu/{name}'] = np.zeros_like(value, np.float64)
    return state

  def update(grads: dict, state: dict, params: dict):
    if not jitted:
      jitted.append(_jitted_adam_step(require_optax("KIP's Adam"), b1, b2, eps))
    names = list(grads)
    as64 = lambda arrays: {name: np.asarray(arrays[name], np.float64) for name in names}
    count = int(state['count'])
    with _enable_x64():
      # The rate of this step (the schedule at the step count before it, as optax's own
      # schedules are called), passed in so that one compiled step serves every rate.
      updates, mu, nu = jitted[0](
          as64(grads), as64({n: state[f'mu/{n}'] for n in names}),
          as64({n: state[f'nu/{n}'] for n in names}), np.int32(count),
          np.float64(schedule(count)))
      new_state, new_params = dict(state), dict(params)
      for name in names:
        new_params[name] = (np.asarray(params[name], np.float64) +
                            np.asarray(updates[name])).astype(params[name].dtype)
        new_state[f'mu/{name}'] = np.asarray(mu[name])
        new_state[f'nu/{name}'] = np.asarray(nu[name])
    new_state['count'] = np.asarray(count + 1, np.int64)
    return new_params, new_state

  return GradientTransformation(init, update)


def _jitted_adam_step(optax: ModuleType, b1: float, b2: float, eps: float) -> Callable:
  """jit of (grads, mu, nu, count, rate) -> (updates, new mu, new nu): one `optax.adam(rate)`
  update from the saved moments and step count (call it with float64 enabled)."""
  import jax  # pylint: disable=import-outside-toplevel

  def step(grads, mu, nu, count, rate):
    transform = optax.adam(rate, b1=b1, b2=b2, eps=eps)
    state = tuple(part._replace(count=count, mu=mu, nu=nu)
                  if isinstance(part, optax.ScaleByAdamState) else part
                  for part in transform.init(grads))
    updates, state = transform.update(grads, state)
    adam_state = next(part for part in state if isinstance(part, optax.ScaleByAdamState))
    return updates, adam_state.mu, adam_state.nu

  return jax.jit(step)
