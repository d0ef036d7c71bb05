"""Finite-width evaluation: train an `Architecture` on a support set, measure its test accuracy.

Two training protocols from the literature are provided as presets:

* `rcig_protocol(support_size)`: Adam, linear warm-up then cosine decay, MSE on the given
  (possibly learned) labels, optionally its augmentation (`augment.one_of`), as RCIG (Loo et
  al., 2023) evaluates its distilled sets.
* `kip_protocol()`: SGD with heavy-ball momentum 0.9, cosine decay, 5000 steps, batch 100, L2
  1e-3, MSE, as KIP (Nguyen et al., 2021). KIP sets the learning rate relative to the largest
  stable one, estimated from the empirical NTK of the network at initialisation;
  `stable_learning_rate` makes that estimate and `learning_rate=None` uses it at train time.

`paper_protocol(name, support_size)` returns either by its name (`choices.PAPER_PROTOCOLS`,
what `ntkdd evaluate --protocol` takes), and `with_steps` rescales a protocol to another number
of steps, warm-up and schedule in proportion (a shortened protocol for a smoke test).

Conventions. Images are NHWC (or flat (n, d) for 'fc') float32, already preprocessed. Integer
labels are class ids; for MSE they become one-hot minus 1/C ("mean-centred", as everywhere in
ntkdd). Float labels of shape (n, C) (learned labels of a distilled set) are regressed on as
given, MSE only. The MSE loss is 0.5 * mean over batch *and* classes of (f - y)^2, the
convention of neural-tangents' `predict.max_learning_rate`, to which `stable_learning_rate` is
matched. `weight_decay` adds 0.5 * wd * ||params||^2 to the loss (its gradient is wd * params).

optax is needed only here and is imported lazily (`pip install optax` or `pip install
ntkdd[train]`), so that the rest of `ntkdd.common` imports without it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntkdd.common import architectures
from ntkdd.common import augment as augment_lib
from ntkdd.common import optional
from ntkdd.common import stax
from ntkdd.common.choices import PAPER_PROTOCOLS
from ntkdd.common.preprocess import one_hot_centered

# The finite networks' optimisers (RCIG's support set has its own: rcig.SUPPORT_OPTIMIZERS).
TRAIN_OPTIMIZERS = ('adam', 'sgd_momentum')
SCHEDULES = ('cosine', 'constant')
LOSSES = ('mse', 'xent')

Params = Any


def _import_optax():
  return optional.require('optax', 'Training finite-width networks', 'train')


# ----------------------------------------------------------------------------------------------
# Configuration and presets.

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train a finite network on a support set.

  learning_rate: peak learning rate; None means "lr_factor times the largest stable learning
    rate of the empirical NTK at initialisation" (`stable_learning_rate`), re-estimated for
    every seed. Only for 'sgd_momentum' (Adam's step size is not governed by the NTK).
  batch_size: capped at the support-set size at train time (then every step is full-batch).
  warmup_steps: linear warm-up from ~0 to the peak, then the `schedule` over the rest.
  schedule_steps: the length of warm-up plus decay; 0: `steps`. Steps past it keep the
    schedule's last rate (RCIG's evaluation trains 2.5 times its schedule's length, see
    `rcig_protocol`).
  final_lr_fraction: the cosine decays to this fraction of the peak (optax's `alpha`).
  warmup_from_zero: the warm-up rate is peak * step / warmup_steps (optax's linear_schedule
    from 0: the first step has rate 0) instead of peak * (step + 1) / warmup_steps.
  weight_decay: L2 penalty 0.5 * wd * ||params||^2 added to the loss.
  augment: random horizontal flip and random crop after zero-padding by `crop_padding` pixels
    (4 is the usual choice for 32x32 images, 2 for 28x28).
  augmentations: RCIG's augmentation instead: each image of a batch gets one op drawn from
    this '_'-joined list (`augment.OPS`: flip, color, crop, rotate, translate, cutout).
  zero_readout: start the readout layer at zero. A net that interpolates a few support images
    keeps its random initial function f0 on test images, and f0's O(1) noise swamps the
    predictions (MNIST, 100 random images, fc width 512: 35% test accuracy with a random
    readout, 71% with a zero one); the kernel regression it stands in for has no f0 either.
  """
  steps: int = 1000
  batch_size: int = 256
  learning_rate: Optional[float] = 1e-3
  lr_factor: float = 1.0
  optimizer: str = 'adam'
  momentum: float = 0.9
  schedule: str = 'cosine'
  warmup_steps: int = 0
  schedule_steps: int = 0
  final_lr_fraction: float = 0.0
  warmup_from_zero: bool = False
  weight_decay: float = 0.0
  loss: str = 'mse'
  augment: bool = False
  crop_padding: int = 4
  augmentations: str = ''
  eval_batch_size: int = 1000
  zero_readout: bool = True

  def __post_init__(self):
    if self.steps <= 0:
      raise ValueError(f'steps must be > 0, got {self.steps}.')
    if self.batch_size <= 0 or self.eval_batch_size <= 0:
      raise ValueError(f'batch sizes must be > 0, got batch_size={self.batch_size}, '
                       f'eval_batch_size={self.eval_batch_size}.')
    if self.optimizer not in TRAIN_OPTIMIZERS:
      raise ValueError(f'optimizer must be one of {TRAIN_OPTIMIZERS}, got {self.optimizer!r}.')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'schedule must be one of {SCHEDULES}, got {self.schedule!r}.')
    if self.loss not in LOSSES:
      raise ValueError(f'loss must be one of {LOSSES}, got {self.loss!r}.')
    if self.learning_rate is None:
      if self.optimizer != 'sgd_momentum':
        raise ValueError('learning_rate=None (auto from the empirical NTK) needs '
                         "optimizer='sgd_momentum'; give Adam an explicit learning_rate.")
    elif not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0 (or None for auto), got {self.learning_rate}.')
    if not self.lr_factor > 0:
      raise ValueError(f'lr_factor must be > 0, got {self.lr_factor}.')
    if not 0 <= self.momentum < 1:
      raise ValueError(f'momentum must be in [0, 1), got {self.momentum}.')
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f'warmup_steps must be in [0, steps), got {self.warmup_steps} '
                       f'with steps={self.steps}.')
    if self.schedule_steps and not self.warmup_steps < self.schedule_steps <= self.steps:
      raise ValueError(f'schedule_steps must be 0 or in (warmup_steps, steps], got '
                       f'{self.schedule_steps} with warmup_steps={self.warmup_steps}, '
                       f'steps={self.steps}.')
    if not 0 <= self.final_lr_fraction < 1:
      raise ValueError(f'final_lr_fraction must be in [0, 1), got {self.final_lr_fraction}.')
    if self.weight_decay < 0:
      raise ValueError(f'weight_decay must be >= 0, got {self.weight_decay}.')
    if self.crop_padding < 0:
      raise ValueError(f'crop_padding must be >= 0, got {self.crop_padding}.')
    if self.augmentations:
      augment_lib.parse_strategy(self.augmentations)
      if self.augment:
        raise ValueError('Give augment=True (flips and crops) or augmentations, not both.')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def rcig_protocol(support_size: int, learning_rate: float = 1e-4,
                  augmentations: str = '') -> TrainConfig:
  """RCIG's evaluation as its code's loop runs it (yolky/RCIG eval.py, lines 203-267): Adam
  whose rate warms up linearly from 0 over 500 steps (optax's linear_schedule) and then
  decays by a cosine to 1% of the peak (optax's cosine_decay_schedule, alpha=0.01) at the end
  of a schedule of 1000 steps for a support of 10 images, else 2000; MSE on the given labels;
  batch 256 (the whole support when it has at most 256 images); a randomly initialised readout.

  The steps actually taken differ from the schedule's length: the code trains in chunks of
  500 steps (`do_training_steps(..., n_steps=500)`), 1000 // 200 = 5 chunks (2000 // 200 = 10)
  without augmentation, so 2500 steps (5000), the last 1500 (3000) at the final 1% rate; and
  1000 // 500 = 2 chunks (2000 // 500 = 4) with augmentation, so 1000 steps (2000), the
  schedule's length. `augmentations` (one op per image, e.g.
  `augment.default_strategy(channels)`) selects the second.

  RCIG trains standard-parameterised networks with Adam at 1e-4 (the default here; use it with
  Architecture('rcig_convnet', w_std=1, b_std=0, parameterization='standard')). In the NTK
  parameterisation Adam's steps, which are in raw-parameter units, move each layer's output
  W_std / sqrt(fan_in) times less, and 1e-4 barely trains (a width-32 ConvNet on the toy
  problem of tests/test_train.py: 0.62 test accuracy after this protocol, against 0.995 at
  1e-3, and 0.99 at 1e-4 in the standard parameterisation): use 1e-3 there.
  """
  if support_size <= 0:
    raise ValueError(f'support_size (images) must be > 0, got {support_size}.')
  schedule_steps = 1000 if support_size == 10 else 2000
  chunk, chunks_per = 500, (500 if augmentations else 200)
  steps = chunk * (schedule_steps // chunks_per)
  return TrainConfig(steps=steps, batch_size=256, learning_rate=learning_rate,
                     optimizer='adam', schedule='cosine', warmup_steps=500,
                     schedule_steps=schedule_steps, final_lr_fraction=0.01,
                     warmup_from_zero=True, loss='mse', augmentations=augmentations,
                     zero_readout=False)


def kip_protocol(lr_factor: float = 0.5, steps: int = 5000) -> TrainConfig:
  """KIP's evaluation: SGD with momentum 0.9, cosine decay, batch 100, L2 1e-3, MSE; the
  learning rate is `lr_factor` times the largest stable one of the empirical NTK."""
  return TrainConfig(steps=steps, batch_size=100, learning_rate=None, lr_factor=lr_factor,
                     optimizer='sgd_momentum', momentum=0.9, schedule='cosine',
                     warmup_steps=0, weight_decay=1e-3, loss='mse',
                     # The learning rate comes from the NTK at a standard initialisation;
                     # a zero readout would change that NTK.
                     zero_readout=False)


def adam_learning_rate(parameterization: str) -> float:
  """Adam's peak learning rate for finite nets in `parameterization`: 1e-4 in the standard one
  (RCIG's), 1e-3 in the NTK one, whose layers move W_std / sqrt(fan_in) times less per step
  (see `rcig_protocol`).

  Args:
    parameterization: 'ntk' or 'standard'.

  Returns:
    The peak learning rate.
  """
  if parameterization not in ('ntk', 'standard'):
    raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}.")
  return 1e-3 if parameterization == 'ntk' else 1e-4


def paper_protocol(name: str, support_size: int, parameterization: str = 'standard',
                   learning_rate: Optional[float] = None,
                   augmentations: str = '') -> TrainConfig:
  """The evaluation protocol of a paper, with the paper's step count.

  Args:
    name: 'kip' (`kip_protocol`: SGD with momentum 0.9, 5000 steps, batch 100, L2 1e-3, the
      learning rate half the largest stable one of the empirical NTK) or 'rcig'
      (`rcig_protocol`: Adam, 2500 steps for 10 images, else 5000; 1000 or 2000 with its
      augmentation).
    support_size: images in the support set (RCIG's schedule depends on it).
    parameterization: of the networks to train; RCIG's default Adam rate follows it
      (`adam_learning_rate`). KIP's rate comes from each network's own NTK.
    learning_rate: RCIG only: Adam's peak rate instead of `adam_learning_rate`'s.
    augmentations: RCIG only: its augmentation ('_'-joined `augment.OPS`, e.g.
      `augment.default_strategy(channels)`), which also selects its shorter loop.

  Returns:
    The protocol's `TrainConfig`.
  """
  if name not in PAPER_PROTOCOLS:
    raise ValueError(f'Unknown paper protocol {name!r}: choose one of {PAPER_PROTOCOLS}.')
  if name == 'kip':
    if learning_rate is not None or augmentations:
      raise ValueError("KIP's protocol sets its learning rate from the empirical NTK and trains "
                       'without augmentation: give neither learning_rate nor augmentations.')
    return kip_protocol()
  if learning_rate is None:
    learning_rate = adam_learning_rate(parameterization)
  return rcig_protocol(support_size, learning_rate, augmentations)


def with_steps(config: TrainConfig, steps: int) -> TrainConfig:
  """`config` shortened (or lengthened) to `steps` steps, its warm-up and schedule scaled by
  the same factor, so that a protocol keeps its shape (e.g. a smoke test of a paper's).

  A warm-up is kept shorter than `steps`, and a schedule longer than the warm-up and no
  longer than `steps`, so that the result is always a valid `TrainConfig`.

  Args:
    config: the configuration to rescale.
    steps: the number of training steps wanted (>= 1).

  Returns:
    `config` with `steps`, `warmup_steps` and `schedule_steps` rescaled (`config` itself when
    `steps` is already its number).
  """
  if steps <= 0:
    raise ValueError(f'steps must be > 0, got {steps}.')
  if steps == config.steps:
    return config
  scale = steps / config.steps
  warmup_steps = min(round(config.warmup_steps * scale), steps - 1)
  schedule_steps = 0
  if config.schedule_steps:
    schedule_steps = min(steps, max(round(config.schedule_steps * scale), warmup_steps + 1))
  return dataclasses.replace(config, steps=steps, warmup_steps=warmup_steps,
                             schedule_steps=schedule_steps)


def learning_rate_schedule(config: TrainConfig) -> Callable:
  """Multiplier in [0, 1] of the peak learning rate at each step (jnp-traceable)."""
  warmup, steps = config.warmup_steps, config.schedule_steps or config.steps
  floor = config.final_lr_fraction
  # (step + 1) so that the first warm-up step already moves the parameters, unless the
  # warm-up is optax's (from 0).
  offset = 0.0 if config.warmup_from_zero else 1.0

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    factor = jnp.minimum(1.0, (step + offset) / warmup) if warmup > 0 else jnp.float32(1.0)
    if config.schedule == 'cosine':
      progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      if floor:
        factor = factor * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
      else:
        factor = factor * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return factor

  return schedule


# ----------------------------------------------------------------------------------------------
# The network, losses, augmentation.

@functools.lru_cache(maxsize=32)
def _network(arch: architectures.Architecture, num_outputs: int) -> stax.Layer:
  # Cached so that apply_fn keeps its identity and the jitted functions built on it are reused.
  return architectures.build(arch, num_outputs)


def _num_outputs(params: Params) -> int:
  """Logits of a network built by `architectures.build`: the readout Dense is the last layer."""
  weights, _ = params[-1]
  return int(weights.shape[-1])


def init_params(arch: architectures.Architecture, input_shape: Sequence[int], num_classes: int,
                seed: int, zero_readout: bool = False) -> Params:
  """Parameters of `arch` for inputs of shape (n, ...) at initialisation `seed`."""
  init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
  _, params = _network(arch, num_classes).init_fn(init_key, (-1,) + tuple(input_shape[1:]))
  if zero_readout:
    weights, bias = params[-1]
    params = params[:-1] + ((jnp.zeros_like(weights), jnp.zeros_like(bias)),)
  return params


def mse_loss(logits, targets):
  """0.5 * mean over batch and classes of squared errors (neural-tangents' convention)."""
  return 0.5 * jnp.mean(jnp.square(logits - targets))


def xent_loss(logits, labels_int):
  """Softmax cross-entropy against integer class ids, averaged over the batch."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels_int[:, None], axis=1))


def _squared_norm(params: Params):
  return sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))


def augment(key, images, crop_padding: int):
  """Random horizontal flips and random crops of zero-padded NHWC images (shapes kept): each
  image flipped with probability 1/2, then shifted by up to `crop_padding` pixels."""
  if images.ndim != 4:
    raise ValueError(f'augment needs NHWC images, got shape {images.shape}.')
  flip_key, crop_key = jax.random.split(key)
  keys = lambda k: jax.random.split(k, images.shape[0])
  images = jax.vmap(augment_lib.flip)(keys(flip_key), images)
  if crop_padding == 0:
    return images
  crop = lambda k, image: augment_lib.shift(k, image, crop_padding, crop_padding)
  return jax.vmap(crop)(keys(crop_key), images)


def _optimizer(config: TrainConfig, learning_rate):
  """The optax transformation; `learning_rate` may be a traced scalar (auto learning rates
  differ per seed without recompiling)."""
  optax = _import_optax()
  unit = learning_rate_schedule(config)
  schedule = lambda step: learning_rate * unit(step)
  if config.optimizer == 'adam':
    return optax.adam(schedule)
  return optax.sgd(schedule, momentum=config.momentum)


# ----------------------------------------------------------------------------------------------
# The largest stable learning rate from the empirical NTK.

@functools.lru_cache(maxsize=32)
def _ntk_power_step(apply_fn: Callable) -> Callable:
  """Jitted `(params, x, v) -> (Theta v / |Theta v|, v . Theta v)` for a unit vector v."""

  @jax.jit
  def power_step(params, x, v):
    f = lambda p: apply_fn(p, x)
    _, vjp_fn = jax.vjp(f, params)
    # Theta v = J (J^T v), never forming the (nC, nC) Gram or the (nC, P) Jacobian.
    (jt_v,) = vjp_fn(v)
    theta_v = jax.jvp(f, (params,), (jt_v,))[1]
    return theta_v / jnp.linalg.norm(theta_v), jnp.vdot(v, theta_v)

  return power_step


def stable_learning_rate(apply_fn: Callable, params: Params, x, momentum: float = 0.0,
                         max_iterations: int = 100, tolerance: float = 1e-5,
                         seed: int = 0) -> float:
  """Largest stable learning rate of (momentum) gradient descent on the linearised network:
  2 (1 + momentum) / lambda_max of the empirical NTK Gram of the MSE loss.

  With the loss 0.5 * mean((f - y)^2) over the n*C outputs on `x`, the Hessian of the
  linearised model is J^T J / (nC), whose top eigenvalue is that of the flattened (nC, nC)
  NTK Gram Theta = J J^T divided by nC; this matches neural-tangents'
  `predict.max_learning_rate(ntk, y_train_size=nC, momentum)`. The top eigenvalue comes from
  power iteration with Jacobian-vector products (memory O(params + nC)), stopped when the
  Rayleigh quotient changes by less than `tolerance` (relative). Each iteration costs about
  two training steps on all of `x` (1.7 s for 100 28x28 images, depth-3 width-128 ConvNet,
  on 2 CPU cores; ~30 iterations).
  """
  if max_iterations < 1:
    raise ValueError(f'max_iterations must be >= 1, got {max_iterations}.')
  x = jnp.asarray(x, jnp.float32)
  power_step = _ntk_power_step(apply_fn)
  # A Python loop, not lax.while_loop: XLA:CPU runs convolutions inside loops far slower.
  out = jax.eval_shape(apply_fn, params, x)
  v = jax.random.normal(jax.random.PRNGKey(seed), out.shape, out.dtype)
  v = v / jnp.linalg.norm(v)
  previous = math.inf
  for _ in range(max_iterations):
    v, top_eigenvalue = power_step(params, x, v)
    top_eigenvalue = float(top_eigenvalue)
    converged = abs(top_eigenvalue - previous) <= tolerance * abs(top_eigenvalue)
    if converged or not math.isfinite(top_eigenvalue):
      break
    previous = top_eigenvalue
  if not (math.isfinite(top_eigenvalue) and top_eigenvalue > 0):
    raise ValueError(f'The empirical NTK has top eigenvalue {top_eigenvalue}; cannot estimate '
                     'a learning rate (are the images or parameters finite and non-zero?).')
  return 2.0 * (1.0 + momentum) * int(v.size) / top_eigenvalue


# ----------------------------------------------------------------------------------------------
# Training.

@functools.lru_cache(maxsize=32)
def _train_step(arch: architectures.Architecture, num_classes: int, config: TrainConfig,
                batch_size: int) -> Callable:
  """A jitted `step(state, x, y, key, learning_rate, index) -> (state, data_loss)`.

  Training is a Python loop over this step rather than one `lax.scan`: both compile the step
  once, but on XLA:CPU convolutions inside a scan's while loop ran ~20x slower (11 ms vs
  0.5 ms per step for a width-32 ConvNet on 16 8x8 images), and with asynchronous dispatch
  the loop costs no host round trip per step.
  """
  apply_fn = _network(arch, num_classes).apply_fn
  loss_fn = mse_loss if config.loss == 'mse' else xent_loss

  def objective(params, xb, yb):
    data_loss = loss_fn(apply_fn(params, xb), yb)
    total = data_loss
    if config.weight_decay > 0:
      total = total + 0.5 * config.weight_decay * _squared_norm(params)
    return total, data_loss

  @jax.jit
  def step(state, x, y, key, learning_rate, index):
    optax = _import_optax()
    params, opt_state = state
    n = x.shape[0]
    batch_key, augment_key = jax.random.split(jax.random.fold_in(key, index))
    if batch_size < n:
      chosen = jax.random.permutation(batch_key, n)[:batch_size]
      xb, yb = x[chosen], y[chosen]
    else:
      xb, yb = x, y
    if config.augment:
      xb = augment(augment_key, xb, config.crop_padding)
    elif config.augmentations:
      xb = augment_lib.one_of(config.augmentations)(augment_key, xb)
    (_, data_loss), grads = jax.value_and_grad(objective, has_aux=True)(params, xb, yb)
    updates, opt_state = _optimizer(config, learning_rate).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), data_loss

  return step


def _check_finite(name: str, array: np.ndarray) -> None:
  if not np.all(np.isfinite(array)):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise ValueError(f'{name} contains {bad} NaN or infinite values.')


def _check_images(name: str, images: np.ndarray) -> None:
  if images.ndim not in (2, 4):
    raise ValueError(f'{name} must be NHWC images or flat (n, d) rows, got shape {images.shape}.')
  if images.shape[0] == 0:
    raise ValueError(f'{name} is empty.')
  _check_finite(name, images)


def training_targets(support_y, num_classes: int, loss: str) -> np.ndarray:
  """What the loss compares logits with: centred one-hot (MSE, int labels), the float labels
  themselves (MSE), or the int labels (xent)."""
  support_y = np.asarray(support_y)
  if np.issubdtype(support_y.dtype, np.integer):
    if support_y.ndim != 1:
      raise ValueError(f'Integer labels must be 1-D class ids, got shape {support_y.shape}.')
    if support_y.min() < 0 or support_y.max() >= num_classes:
      raise ValueError(f'Integer labels must lie in 0..{num_classes - 1}, got '
                       f'{support_y.min()}..{support_y.max()}.')
    if loss == 'xent':
      return support_y.astype(np.int32)
    return one_hot_centered(support_y, num_classes)
  if not np.issubdtype(support_y.dtype, np.floating):
    raise ValueError(f'Labels must be int class ids or float (n, C) arrays, got {support_y.dtype}.')
  if loss == 'xent':
    raise ValueError("loss='xent' needs integer class ids; real-valued (learned) labels are "
                     "only supported with loss='mse'.")
  if support_y.ndim != 2 or support_y.shape[1] != num_classes:
    raise ValueError(f'Float labels must have shape (n, num_classes={num_classes}), got '
                     f'{support_y.shape}; pass integer class ids as an int array.')
  _check_finite('support_y', support_y)
  return support_y.astype(np.float32)


def _resolve_learning_rate(arch, num_classes, config, params, support_x) -> float:
  if config.learning_rate is not None:
    return float(config.learning_rate)
  apply_fn = _network(arch, num_classes).apply_fn
  return config.lr_factor * stable_learning_rate(apply_fn, params, support_x, config.momentum)


def _validated_support(support_x, support_y, config: TrainConfig,
                        num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  support_x = np.asarray(support_x, np.float32)
  _check_images('support_x', support_x)
  targets = training_targets(support_y, num_classes, config.loss)
  if targets.shape[0] != support_x.shape[0]:
    raise ValueError(f'support_x has {support_x.shape[0]} images but support_y has '
                     f'{targets.shape[0]} labels.')
  if (config.augment or config.augmentations) and support_x.ndim != 4:
    raise ValueError(f'Augmentation needs NHWC images, got shape {support_x.shape}.')
  return support_x, targets


def _fit(arch, support_x: np.ndarray, targets: np.ndarray, config: TrainConfig, seed: int,
         num_classes: int) -> tuple[Params, np.ndarray, float]:
  """Trained parameters, per-step data losses and the peak learning rate used."""
  params = init_params(arch, support_x.shape, num_classes, seed, config.zero_readout)
  learning_rate = _resolve_learning_rate(arch, num_classes, config, params, support_x)
  batch_size = min(config.batch_size, support_x.shape[0])
  # The learning rate is a traced argument, and fields the step never reads are normalised,
  # so that configs differing only in them share one compilation.
  trainer_config = dataclasses.replace(config, learning_rate=1.0, lr_factor=1.0,
                                       eval_batch_size=1)
  step = _train_step(arch, num_classes, trainer_config, batch_size)
  _, train_key = jax.random.split(jax.random.PRNGKey(seed))
  x, y, lr = jnp.asarray(support_x), jnp.asarray(targets), jnp.float32(learning_rate)
  # The optimiser state does not depend on the learning rate's value.
  state = (params, _optimizer(config, 1.0).init(params))
  losses = []
  for index in range(config.steps):
    state, data_loss = step(state, x, y, train_key, lr, jnp.int32(index))
    losses.append(data_loss)
  return state[0], np.asarray(jnp.stack(losses)), learning_rate


def train_network(arch: architectures.Architecture, support_x, support_y, config: TrainConfig,
                  seed: int = 0, num_classes: int = 10,
                  return_losses: bool = False) -> Params | tuple[Params, np.ndarray]:
  """Parameters of `arch` after training on the support set with `config` from init `seed`.

  Deterministic given `seed` (initialisation, batches and augmentation all derive from it).
  With return_losses, also the per-step data loss (without the L2 term) on the batches.
  """
  support_x, targets = _validated_support(support_x, support_y, config, num_classes)
  params, losses, _ = _fit(arch, support_x, targets, config, seed, num_classes)
  return (params, losses) if return_losses else params


# ----------------------------------------------------------------------------------------------
# Prediction and evaluation.

@functools.lru_cache(maxsize=32)
def _jitted_apply(arch: architectures.Architecture, num_outputs: int) -> Callable:
  return jax.jit(_network(arch, num_outputs).apply_fn)


def predict(arch: architectures.Architecture, params: Params, x,
            batch_size: int = 1000) -> np.ndarray:
  """Logits (n, C) of the network on `x`, in batches of `batch_size` (the last one padded so
  that every batch has one shape and compiles once)."""
  x = np.asarray(x, np.float32)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}.')
  apply_fn = _jitted_apply(arch, _num_outputs(params))
  n = x.shape[0]
  if n == 0:
    return np.zeros((0, _num_outputs(params)), np.float32)
  batch_size = min(batch_size, n)
  outputs = []
  for start in range(0, n, batch_size):
    batch = x[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - real,) + x.shape[1:], x.dtype)])
    outputs.append(np.asarray(apply_fn(params, jnp.asarray(batch)))[:real])
  return np.concatenate(outputs)


def accuracy(logits, labels) -> float:
  """Fraction of rows whose argmax logit is the label (int ids, or (n, C) one-hot-like rows)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if labels.ndim == 2:
    labels = labels.argmax(axis=1)
  if logits.shape[0] != labels.shape[0]:
    raise ValueError(f'{logits.shape[0]} logits rows but {labels.shape[0]} labels.')
  return float(np.mean(logits.argmax(axis=1) == labels))


def evaluate_transfer(arch: architectures.Architecture, support_x, support_y, x_test, y_test,
                      config: TrainConfig, seeds: Sequence[int] = (0, 1, 2),
                      num_classes: int = 10,
                      progress: Optional[Callable[[int, float], None]] = None) -> dict[str, Any]:
  """Test accuracy of `arch` trained on the support set, once per initialisation seed.

  Returns a dict with `mean`, `std`, `accuracies` (one fraction in [0, 1] per seed), `seeds`,
  `learning_rates` (the resolved peak learning rate per seed), `diverged` (per seed: non-finite
  logits on the test set), `steps` and `seconds` (wall-clock of the whole evaluation).
  `progress(seed, accuracy)` is called after each seed.
  """
  start = time.perf_counter()
  support_x, targets = _validated_support(support_x, support_y, config, num_classes)
  x_test = np.asarray(x_test, np.float32)
  y_test = np.asarray(y_test)
  _check_images('x_test', x_test)
  if x_test.shape[1:] != support_x.shape[1:]:
    raise ValueError(f'Test images have shape {x_test.shape[1:]} but support images '
                     f'{support_x.shape[1:]}.')
  if y_test.shape[0] != x_test.shape[0]:
    raise ValueError(f'x_test has {x_test.shape[0]} images but y_test has '
                     f'{y_test.shape[0]} labels.')
  if len(seeds) == 0:
    raise ValueError('Need at least one seed.')
  accuracies, learning_rates, diverged = [], [], []
  for seed in seeds:
    params, _, learning_rate = _fit(arch, support_x, targets, config, seed, num_classes)
    logits = predict(arch, params, x_test, config.eval_batch_size)
    accuracies.append(accuracy(logits, y_test))
    learning_rates.append(learning_rate)
    diverged.append(not bool(np.all(np.isfinite(logits))))
    if progress is not None:
      progress(seed, accuracies[-1])
  return {
      'mean': float(np.mean(accuracies)),
      'std': float(np.std(accuracies)),
      'accuracies': accuracies,
      'seeds': list(seeds),
      'learning_rates': learning_rates,
      'diverged': diverged,
      'steps': config.steps,
      'seconds': time.perf_counter() - start,
  }
