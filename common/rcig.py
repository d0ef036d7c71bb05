"""RCIG (Loo et al., ICML 2023): dataset distillation by convexified implicit gradients."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ntkdd.common import architectures, optim, optional, stax
from ntkdd.common.choices import INITS

# How it works, in this module's names.
#
# The distillation net is a ConvNet split into a body phi(x; theta) (everything up to the
# flattened penultimate features) and a linear readout. For a pool model (theta0, readout0)
# the body is linearised, phi_lin(x; delta) = phi(x; theta0) + J_phi(x) delta, and the readout
# is reparameterised as a function of the body: the pool model's own readout plus the
# kernel-ridge correction fitted on the support set's linearised features (ridge lambda =
# l2_rate |S|), so predictions are f0(x) + K_xS (K_SS + lambda I)^-1 (y_S - f0(S)) with
# K = phi_lin phi_lin' and f0 the pool readout on phi_lin. The inner loss is the support's
# ridge objective at that optimal readout plus an L2 term on delta: the "convexified" inner
# problem (linear in delta before the readout), solved approximately by a few Adam steps
# (`inner_solve`). The meta-gradient of the outer loss L_o(delta*(S), S) (cross-entropy on a
# real batch) is
#   dL_o/dS = dL_o/dS|_delta  -  d2L_i/dS ddelta . H^-1 . dL_o/ddelta,
# with H^-1 v approximated by Adam on 0.5 x'Hx - v'x (`hessian_inverse_vector_product`).
#
# Losses are written as functions of (delta, support, ctx) where `support` is the dict of
# learned arrays ({'images', 'labels'}) and `ctx` a dict of arrays held fixed (the pool
# model's body and readout parameters, the target batch). The jitted helpers are cached on
# the loss functions' identities, so each is compiled once per shape.

Params = Any
Support = dict
InnerLoss = Callable[[Params, Support, dict], jax.Array]
OuterLoss = Callable[[Params, Support, jax.Array, dict], tuple]

SUPPORT_OPTIMIZERS = ('adabelief', 'adam')   # the support set's (finite nets: TRAIN_OPTIMIZERS)


@dataclasses.dataclass(frozen=True)
class RcigConfig:
  """Every setting of an RCIG run (defaults: the paper's, except where CPU budgets rule)."""
  # The distillation net: RCIG's ConvNet body (widths width * 2^i) + linear readout, standard
  # parameterisation and the initialisation of the paper's code (LeCun normal weights, zero
  # biases; its learning rates are in those units).
  width: int = 128
  depth: int = 3
  w_std: float = 1.0
  b_std: float = 0.0
  parameterization: str = 'standard'
  softplus_beta: float = 60.0       # softplus(beta x)/beta for ReLU while distilling; 0: ReLU
  batch_norm: bool = False          # batch normalisation (batch statistics) after each conv
  # Inner problem and implicit gradient.
  l2_rate: float = 5e-4             # ridge lambda = l2_rate * |S|; also the L2 on delta
  inner_steps: int = 20
  inner_lr: float = 1e-3            # Adam on delta: the start; then auto-tuned, see below
  inner_lr_decrease: float = 0.5    # lr factor after a solve that raised the inner loss
  inner_lr_increase: float = 1.1    # lr factor after one that lowered it
  hinv_steps: int = 20
  hinv_lr: float = 0.1              # relative to the RMS of the line-search start, see below
  clip_implicit: bool = True        # implicit gradient's norm <= direct gradient's, per leaf
  flip_support: bool = False        # support also used mirrored left-right (paper: RGB data)
  target_batch: int = 256           # real images per outer loss (paper: 1024)
  # Model pool.
  pool_size: int = 30
  max_pool_steps: int = 100         # a pool model is re-initialised once trained this long
  pool_train_steps: int = 15        # each meta-step trains its model 1..this many steps
  pool_lr: float = 5e-5
  # Support set and its optimisers.
  init: str = 'real'
  init_support: str = ''            # start from this support set's file instead (--init-support)
  learn_labels: bool = True
  optimizer: str = 'adabelief'
  lr_images: float = 3e-3
  lr_labels: float = 3e-3
  lr_log_temp: float = 3e-2
  # > 0: the three learning rates above decay together by a cosine to 0 over this many
  # meta-steps (`--lr-schedule cosine`: a short CPU budget moves faster early and settles at
  # the end, where the paper's code runs 10,000 constant-rate steps); 0: constant.
  lr_decay_steps: int = 0
  # The outer loss's log temperature at the start; None: the one saved with the init_support
  # set where it records one (RCIG runs' support.npz), else 0 as the paper.
  init_log_temp: Optional[float] = None
  ema_decay: float = 0.99           # what is saved/evaluated is this EMA of the support; 0: off
  checkpoint_every: int = 10
  # Evaluation: the same ConvNet with ReLU trained on the support (train.rcig_protocol).
  eval_width: int = 128
  eval_parameterization: str = 'standard'
  eval_lr: float = 1e-4
  eval_train_steps: int = 0         # 0: the protocol's (1000 for 10 images, else 2000)
  eval_models: int = 1

  def __post_init__(self):
    positive = ('width', 'inner_steps', 'hinv_steps', 'target_batch', 'pool_size',
                'max_pool_steps', 'pool_train_steps', 'checkpoint_every', 'eval_width',
                'eval_models')
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}.')
    for name in ('inner_lr', 'hinv_lr', 'pool_lr', 'lr_images', 'lr_labels', 'lr_log_temp',
                 'eval_lr', 'l2_rate'):
      if not getattr(self, name) > 0:
        raise ValueError(f'{name} must be > 0, got {getattr(self, name)}.')
    if self.depth < 1 or self.softplus_beta < 0 or self.eval_train_steps < 0 or \
        self.lr_decay_steps < 0:
      raise ValueError('Need depth >= 1, softplus_beta >= 0, eval_train_steps >= 0 and '
                       'lr_decay_steps >= 0.')
    if self.optimizer not in SUPPORT_OPTIMIZERS:
      raise ValueError(f'optimizer must be one of {SUPPORT_OPTIMIZERS}, got {self.optimizer!r}.')
    if self.init not in INITS:
      raise ValueError(f'init must be one of {INITS}, got {self.init!r}.')
    if not (0 < self.inner_lr_decrease <= 1 <= self.inner_lr_increase):
      raise ValueError('Need 0 < inner_lr_decrease <= 1 <= inner_lr_increase.')
    optim.check_ema_decay(self.ema_decay)
    if self.parameterization not in ('ntk', 'standard') or \
        self.eval_parameterization not in ('ntk', 'standard'):
      raise ValueError("parameterizations must be 'ntk' or 'standard'.")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'RcigConfig':
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ----------------------------------------------------------------------------------------------
# The network: body + readout.

def Softplus(beta: float = 60.0) -> stax.Layer:
  """softplus(beta x) / beta: a smooth ReLU (finite networks only)."""

  def init_fn(rng, input_shape):
    return input_shape, ()

  def apply_fn(params, x, **unused):
    return jax.nn.softplus(beta * x) / beta

  def kernel_fn(k):
    raise NotImplementedError('Softplus has no infinite-width kernel here.')

  return stax.Layer(init_fn, apply_fn, kernel_fn)


def BatchNorm(eps: float = 1e-5) -> stax.Layer:
  """Per-channel normalisation with the batch's own statistics (over images and pixels), then
  a learned scale and offset (finite networks only). No running averages: the distillation
  net is only ever applied to whole batches (the support set, a target batch)."""

  def init_fn(rng, input_shape):
    channels = input_shape[-1]
    return input_shape, (jnp.ones((channels,), jnp.float32), jnp.zeros((channels,), jnp.float32))

  def apply_fn(params, x, **unused):
    scale, offset = params
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * lax.rsqrt(var + eps) * scale + offset

  def kernel_fn(k):
    raise NotImplementedError('BatchNorm has no infinite-width kernel here.')

  return stax.Layer(init_fn, apply_fn, kernel_fn)


def build_body(cfg: RcigConfig) -> stax.Layer:
  """RCIG's ConvNet (`architectures.rcig_convnet_body`) up to and including Flatten, with
  softplus for ReLU while distilling."""
  act = (lambda: Softplus(cfg.softplus_beta)) if cfg.softplus_beta > 0 else stax.Relu
  return stax.serial(*architectures.rcig_convnet_body(
      cfg.depth, cfg.width, cfg.w_std, cfg.b_std, cfg.parameterization, act,
      BatchNorm if cfg.batch_norm else None))


def build_network(cfg: RcigConfig, num_classes: int) -> stax.Layer:
  """Body then a Dense readout; params are (body_params, readout_params)."""
  return stax.serial(build_body(cfg),
                     stax.Dense(num_classes, cfg.w_std, cfg.b_std, cfg.parameterization))


def init_model(cfg: RcigConfig, key, image_shape, num_classes: int) -> Params:
  _, params = build_network(cfg, num_classes).init_fn(key, (-1,) + tuple(image_shape))
  return params


def closed_form_last_layer(features, labels, l2):
  """argmin_W 0.5 ||features W - labels||^2 + 0.5 l2 ||W||^2, in the dual form when the
  feature dimension is at least the number of rows, else in the primal."""
  n, f = features.shape
  if f >= n:
    gram = features @ features.T + l2 * jnp.eye(n, dtype=features.dtype)
    return features.T @ jnp.linalg.solve(gram, labels)
  gram = features.T @ features + l2 * jnp.eye(f, dtype=features.dtype)
  return jnp.linalg.solve(gram, features.T @ labels)


def linearized_features(body_apply: Callable, params0: Params, delta: Params, x):
  """(phi(x; theta0), phi(x; theta0) + J_phi(x) delta)."""
  phi0, tangent = jax.jvp(lambda p: body_apply(p, x), (params0,), (delta,))
  return phi0, phi0 + tangent


def squared_norm(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def make_losses(cfg: RcigConfig) -> tuple[InnerLoss, OuterLoss]:
  """The inner loss L_i(delta, support, ctx) and outer loss L_o(delta, support, log_temp, ctx)
  -> (loss, target accuracy) of the linearised ConvNet; ctx holds 'params0' (body),
  'readout0' (the pool model's readout), 'x_target' and 'y_target' (int ids)."""
  return _losses(cfg.width, cfg.depth, cfg.w_std, cfg.b_std, cfg.parameterization,
                 cfg.softplus_beta, cfg.l2_rate, cfg.flip_support, cfg.batch_norm)


def with_flips(images, labels):
  """The support and its left-right mirror images (NHWC), labels repeated: the RCIG code's
  augmentation of RGB coresets. Linear in the images, so gradients flow to both copies."""
  return (jnp.concatenate([images, images[:, :, ::-1, :]], axis=0),
          jnp.concatenate([labels, labels], axis=0))


class FeatureLosses(NamedTuple):
  """The losses' pieces in the space of the body's features (see `structured_step_gradients`)."""
  body_apply: Callable        # (body params, images) -> features
  readout_apply: Callable     # (readout params, features) -> logits
  support_inputs: Callable    # support dict -> (images, labels), mirrored copies added if set
  fit: Callable               # (phi_S, labels, readout0) -> (residual, ridge correction)
  feature_loss: Callable      # (phi_S, labels, readout0) -> inner loss without the L2 on delta
  outer_from_features: Callable  # (phi_T, phi_S, labels, readout0, log_temp, y_target)
                              # -> (outer loss, target accuracy)


@functools.lru_cache(maxsize=16)
def _feature_losses(width, depth, w_std, b_std, parameterization, softplus_beta, l2_rate,
                    flip_support=False, batch_norm=False) -> FeatureLosses:
  # Cached on the settings that matter, so that the functions keep their identity across calls
  # (and configs differing elsewhere) and the jitted helpers built on them compile once.
  cfg = RcigConfig(width=width, depth=depth, w_std=w_std, b_std=b_std,
                   parameterization=parameterization, softplus_beta=softplus_beta,
                   l2_rate=l2_rate, batch_norm=batch_norm)
  body_apply = build_body(cfg).apply_fn
  readout_apply = stax.Dense(1, w_std, b_std, parameterization).apply_fn

  def support_inputs(support):
    images, labels = support['images'], support['labels']
    return with_flips(images, labels) if flip_support else (images, labels)

  def fit(phi, labels, readout0):
    """(residual on the support, ridge correction of the readout) at the optimal readout."""
    prior = labels - readout_apply(readout0, phi)
    correction = closed_form_last_layer(phi, prior, l2_rate * phi.shape[0])
    return prior - phi @ correction, correction

  def feature_loss(phi, labels, readout0):
    residual, correction = fit(phi, labels, readout0)
    return (0.5 * jnp.sum(jnp.square(residual)) / residual.shape[0]
            + 0.5 * l2_rate * jnp.sum(jnp.square(correction)))

  def outer_from_features(phi_target, phi_support, labels, readout0, log_temp, y_target):
    _, correction = fit(phi_support, labels, readout0)
    predictions = readout_apply(readout0, phi_target) + phi_target @ correction
    return cross_entropy(predictions * jnp.exp(log_temp), y_target)

  return FeatureLosses(body_apply, readout_apply, support_inputs, fit, feature_loss,
                       outer_from_features)


@functools.lru_cache(maxsize=16)
def _losses(width, depth, w_std, b_std, parameterization, softplus_beta, l2_rate,
            flip_support=False, batch_norm=False):
  pieces = _feature_losses(width, depth, w_std, b_std, parameterization, softplus_beta,
                           l2_rate, flip_support, batch_norm)
  body_apply = pieces.body_apply

  def support_fit(delta, support, ctx):
    """(residual on the support, ridge correction of the readout) at the optimal readout."""
    images, labels = pieces.support_inputs(support)
    _, phi = linearized_features(body_apply, ctx['params0'], delta, images)
    return pieces.fit(phi, labels, ctx['readout0'])

  def inner_loss(delta, support, ctx):
    residual, correction = support_fit(delta, support, ctx)
    # The ridge objective per support image, 0.5 mean_i ||r_i||^2 + 0.5 l2_rate ||W||^2
    # (lambda = l2_rate |S| spread over the |S| rows), plus the same L2 on delta.
    return (0.5 * jnp.sum(jnp.square(residual)) / residual.shape[0]
            + 0.5 * l2_rate * (jnp.sum(jnp.square(correction)) + squared_norm(delta)))

  def outer_loss(delta, support, log_temp, ctx):
    _, correction = support_fit(delta, support, ctx)
    _, phi = linearized_features(body_apply, ctx['params0'], delta, ctx['x_target'])
    predictions = pieces.readout_apply(ctx['readout0'], phi) + phi @ correction
    return cross_entropy(predictions * jnp.exp(log_temp), ctx['y_target'])

  return inner_loss, outer_loss


def cross_entropy(logits, labels_int):
  """(mean cross-entropy, accuracy)."""
  log_probs = jax.nn.log_softmax(logits)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels_int[:, None], axis=1))
  return loss, jnp.mean(jnp.argmax(logits, axis=1) == labels_int)


# ----------------------------------------------------------------------------------------------
# Adam on pytrees: optax's, one jitted step (the loops stay in Python because XLA:CPU runs
# convolutions inside while loops much slower, see train._train_step). The state keeps RCIG's
# own layout (mu, nu, count), which the pool models' checkpoints store, and is handed to optax
# as its ScaleByAdamState.

def _optax():
  return optional.require('optax', 'RCIG distillation', 'train')


class AdamState(NamedTuple):
  mu: Params
  nu: Params
  count: jax.Array


def adam_init(params: Params) -> AdamState:
  state = _optax().scale_by_adam().init(params)
  return AdamState(state.mu, state.nu, state.count)


@jax.jit
def adam_update(grads: Params, state: AdamState, params: Params,
                lr) -> tuple[Params, AdamState]:
  """One step of `optax.adam(lr)` (default b1, b2, eps) on `params`: (new params, new state).
  lr may be traced (no recompilation when it changes)."""
  optax = _optax()
  adam_state = optax.ScaleByAdamState(count=state.count, mu=state.mu, nu=state.nu)
  updates, (new, _) = optax.adam(lr).update(grads, (adam_state, optax.EmptyState()), params)
  return optax.apply_updates(params, updates), AdamState(new.mu, new.nu, new.count)


# ----------------------------------------------------------------------------------------------
# Inner solve, Hessian-inverse-vector product, meta-gradient.

@functools.lru_cache(maxsize=32)
def _inner_grad(inner_loss: InnerLoss) -> Callable:
  return jax.jit(jax.grad(inner_loss))


def inner_solve(inner_loss: InnerLoss, support: Support, ctx: dict, delta0: Params,
                steps: int, lr: float) -> Params:
  """delta after `steps` Adam steps on inner_loss(., support, ctx) from delta0."""
  grad_fn = _inner_grad(inner_loss)
  delta, state = delta0, adam_init(delta0)
  for _ in range(steps):
    delta, state = adam_update(grad_fn(delta, support, ctx), state, delta, lr)
  return delta


@functools.lru_cache(maxsize=32)
def _inner_value(inner_loss: InnerLoss) -> Callable:
  return jax.jit(inner_loss)


def tuned_inner_solve(inner_loss: InnerLoss, support: Support, ctx: dict, delta0: Params,
                      steps: int, lr: float, decrease: float = 0.5,
                      increase: float = 1.1) -> tuple[Params, float]:
  """`inner_solve`, never worse than its start, and the learning rate for the next solve.

  Adam's first steps have size ~lr whatever the gradient, and the support loss at delta = 0
  is often already small (the ridge readout nearly interpolates a small support set), so a
  fixed rate can raise the loss (or overflow it). Like the paper's auto-tuning, the rate
  shrinks after a solve that raised the loss (whose result is then discarded for delta0) and
  grows slowly otherwise.
  """
  delta = inner_solve(inner_loss, support, ctx, delta0, steps, lr)
  value = _inner_value(inner_loss)
  if not float(value(delta, support, ctx)) <= float(value(delta0, support, ctx)):  # or NaN
    return delta0, lr * decrease
  return delta, lr * increase


def _vdot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                            jax.tree_util.tree_leaves(b)))


def hessian_inverse_vector_product(hvp_fn: Callable, v: Params, steps: int, lr: float) -> Params:
  """Approximately H^-1 v for H given as hvp_fn(x) = H x: Adam on 0.5 x'Hx - v'x (gradient
  Hx - v).

  Adam's steps have a fixed size whatever the scale of the solution, so the start and the
  step size are set by the data: x starts at alpha v with alpha = v'v / v'Hv, the exact
  minimiser along v (one Hessian-vector product), and `lr` is relative to that start's RMS.
  The reparameterised inner loss need not be convex at delta*: where v'Hv is not positive,
  alpha uses |v'Hv| or, failing that, the Rayleigh scale ||Hv|| ||v||; where even that is
  zero or not finite the product is taken as 0 (the meta-gradient is then the direct one).
  """
  x, step_size, _ = _hinv_start(hvp_fn, v, lr)
  state = adam_init(x)
  for _ in range(steps):
    grad = jax.tree_util.tree_map(jnp.subtract, hvp_fn(x), v)
    x, state = adam_update(grad, state, x, step_size)
  return x


def _hinv_start(hvp_fn: Callable, v: Params, lr) -> tuple[Params, jax.Array, Params]:
  """The start alpha v and the Adam step size of `hessian_inverse_vector_product`, and
  H alpha v = alpha H v (by linearity, without another product)."""
  hv = hvp_fn(v)
  vv, vhv = _vdot(v, v), _vdot(v, hv)
  scale = jnp.sqrt(vv * _vdot(hv, hv))
  curvature = jnp.where(jnp.abs(vhv) > 1e-6 * scale, jnp.abs(vhv), scale)
  usable = jnp.isfinite(curvature) & (curvature > 0) & jnp.isfinite(vv)
  alpha = jnp.where(usable, vv / jnp.where(usable, curvature, 1.0), 0.0)
  x = jax.tree_util.tree_map(lambda t: alpha * t, v)
  size = jnp.sqrt(_vdot(x, x) / sum(t.size for t in jax.tree_util.tree_leaves(x)))
  return x, lr * size, jax.tree_util.tree_map(lambda t: alpha * t, hv)


@functools.lru_cache(maxsize=32)
def _meta_pieces(inner_loss: InnerLoss, outer_loss: OuterLoss):
  grad_delta = jax.grad(inner_loss)  # (delta, support, ctx) -> dL_i/ddelta

  @jax.jit
  def outer_value_and_grads(delta, support, log_temp, ctx):
    return jax.value_and_grad(outer_loss, argnums=(0, 1, 2), has_aux=True)(
        delta, support, log_temp, ctx)

  @jax.jit
  def hvp(x, delta, support, ctx):
    return jax.jvp(lambda d: grad_delta(d, support, ctx), (delta,), (x,))[1]

  @jax.jit
  def mixed(x, delta, support, ctx):
    # d/dS <dL_i/ddelta(delta, S), x> = (d2 L_i / dS ddelta) x.
    return jax.grad(lambda s: _vdot(grad_delta(delta, s, ctx), x))(support)

  return outer_value_and_grads, hvp, mixed


class MetaGradient(NamedTuple):
  support: Support        # dL_o/dS, direct + (clipped) implicit, per leaf
  log_temp: jax.Array
  loss: jax.Array         # L_o at delta*
  accuracy: jax.Array     # on the target batch
  direct: Support
  implicit: Support       # before clipping


def meta_gradient(inner_loss: InnerLoss, outer_loss: OuterLoss, delta_star: Params,
                  support: Support, log_temp, ctx: dict, *, hinv_steps: int, hinv_lr: float,
                  clip_implicit: bool = True) -> MetaGradient:
  """d L_o(delta*(S), S) / dS by the implicit function theorem, and dL_o/dlog_temp."""
  outer_vg, hvp, mixed = _meta_pieces(inner_loss, outer_loss)
  (loss, accuracy), (g_delta, direct, g_temp) = outer_vg(delta_star, support, log_temp, ctx)
  x = hessian_inverse_vector_product(lambda t: hvp(t, delta_star, support, ctx), g_delta,
                                     hinv_steps, hinv_lr)
  implicit = jax.tree_util.tree_map(jnp.negative, mixed(x, delta_star, support, ctx))
  total = _combine(direct, implicit, clip_implicit)
  return MetaGradient(total, g_temp, loss, accuracy, direct, implicit)


def _combine(direct: Support, implicit: Support, clip_implicit: bool) -> Support:
  """direct + implicit, per leaf. As the paper's code: a non-finite implicit part (a
  Hessian-inverse product that blew up on a non-convex inner loss) counts as zero, leaving the
  direct gradient; with clip_implicit its norm is at most the direct part's."""
  used = jax.tree_util.tree_map(
      lambda g: jnp.where(jnp.all(jnp.isfinite(g)), g, jnp.zeros_like(g)), implicit)
  if clip_implicit:
    used = jax.tree_util.tree_map(_clip_to, used, direct)
  return jax.tree_util.tree_map(jnp.add, direct, used)


@jax.jit
def _clip_to(g, reference):
  norm, limit = jnp.linalg.norm(g), jnp.linalg.norm(reference)
  return g * jnp.minimum(1.0, limit / jnp.maximum(norm, 1e-30))


# ----------------------------------------------------------------------------------------------
# The model pool.

@functools.lru_cache(maxsize=16)
def _pool_grad(cfg_key: tuple, num_classes: int) -> Callable:
  apply_fn = build_network(RcigConfig(*cfg_key), num_classes).apply_fn

  def loss(params, images, labels):
    return 0.5 * jnp.mean(jnp.square(apply_fn(params, images) - labels))

  return jax.jit(jax.grad(loss))


def _network_key(cfg: RcigConfig) -> tuple:
  # The leading RcigConfig fields that define the network, in order.
  return (cfg.width, cfg.depth, cfg.w_std, cfg.b_std, cfg.parameterization, cfg.softplus_beta,
          cfg.batch_norm)


@functools.lru_cache(maxsize=16)
def _pool_step(cfg_key: tuple, num_classes: int) -> Callable:
  """A jitted (params, state, images, labels, lr) -> (params, state): one Adam step of
  `pool_train`, gradient and update in one dispatch."""
  grad_fn = _pool_grad(cfg_key, num_classes)
  return jax.jit(lambda params, state, images, labels, lr: adam_update(
      grad_fn(params, images, labels), state, params, lr))


def pool_train(cfg: RcigConfig, params: Params, state: AdamState, images, labels,
               steps: int, fused: bool = True) -> tuple[Params, AdamState]:
  """`steps` Adam steps (cfg.pool_lr, MSE on the support's labels) of one pool model; fused:
  gradient and update in one jitted call per step (else two, as before; the same numbers)."""
  if cfg.flip_support:
    images, labels = with_flips(images, labels)
  if fused:
    step = _pool_step(_network_key(cfg), int(labels.shape[1]))
    for _ in range(steps):
      params, state = step(params, state, images, labels, cfg.pool_lr)
    return params, state
  grad_fn = _pool_grad(_network_key(cfg), int(labels.shape[1]))
  for _ in range(steps):
    params, state = adam_update(grad_fn(params, images, labels), state, params, cfg.pool_lr)
  return params, state


def zeros_like_body(params: Params) -> Params:
  return jax.tree_util.tree_map(jnp.zeros_like, params[0])


def rcig_step_gradients(cfg: RcigConfig, params0: Params, support: Support, log_temp,
                        x_target, y_target, inner_lr: float) -> tuple[MetaGradient, float]:
  """One meta-gradient of RCIG: inner solve from delta = 0 around the pool model params0 =
  (body, readout) at `inner_lr`, then the implicit gradient on the target batch (x_target,
  int y_target); and the inner learning rate for the next step."""
  inner_loss, outer_loss = make_losses(cfg)
  ctx = {'params0': params0[0], 'readout0': params0[1], 'x_target': x_target,
         'y_target': y_target}
  delta0 = zeros_like_body(params0)
  delta, next_lr = tuned_inner_solve(inner_loss, support, ctx, delta0, cfg.inner_steps,
                                     inner_lr, cfg.inner_lr_decrease, cfg.inner_lr_increase)
  meta = meta_gradient(inner_loss, outer_loss, delta, support, log_temp, ctx,
                       hinv_steps=cfg.hinv_steps, hinv_lr=cfg.hinv_lr,
                       clip_implicit=cfg.clip_implicit)
  return meta, next_lr


# ----------------------------------------------------------------------------------------------
# The structured step: `rcig_step_gradients`'s math with far fewer passes through the body.
#
# The inner loss depends on delta only through the support's linearised features
# phi_S = phi(S; theta0) + J_S delta (and the L2 term), and the outer loss through phi_S and
# the target's phi_T = phi(T; theta0) + J_T delta. So the body is linearised once per step at
# theta0, on the support and on the target batch (`jax.vjp`: the forward pass and the
# activations' derivatives are computed once, not again in every inner and Hessian-inverse
# step), and every derivative in delta goes through J^T (the vjp) and J (its transpose):
#   dL_i/ddelta = J_S^T F'(phi_S) + l2 delta,    H x = J_S^T F''(phi_S) J_S x + l2 x,
#   dL_o/ddelta = J_T^T dL_o/dphi_T + J_S^T dL_o/dphi_S,
# with F the inner loss as a function of the support's features (`FeatureLosses`), and the
# mixed term d/dS <dL_i/ddelta, x> = d/dS <F'(phi_S), J_S x>. Each phase is one jitted call
# (an Adam step fused with its gradient); the vjp closures travel between them as pytrees of
# their residuals, so nothing is re-traced or recompiled per step. The loops over the inner
# and Hessian-inverse steps stay in Python: dispatch is asynchronous (no host round trip until
# the step's end), while XLA:CPU runs convolutions inside while loops far slower (see
# train._train_step) and unrolling them into one jit multiplies the compile time.

class _Linearised(NamedTuple):
  phi0: jax.Array         # the body's features at theta0
  vjp: Callable           # cotangent of phi -> (J^T cotangent,): a jax.tree_util.Partial


def _jvp(lin: _Linearised, tangent: Params) -> jax.Array:
  """J tangent, the transpose of the linearisation's vjp."""
  return jax.linear_transpose(lin.vjp, lin.phi0)((tangent,))[0]


# Images per chunk of the target batch's linearisation: XLA:CPU runs a weight-gradient
# convolution over 256 images at about a third of its speed over 16 (bench/rcig_step.py,
# BENCHMARKS.md), so the target batch is linearised, and its J and J^T applied, chunk by chunk
# (J^T summed over the chunks). Not with batch normalisation, whose statistics are the batch's.
TARGET_CHUNK = 16


def _target_chunks(batch: int, batch_norm: bool) -> list[tuple[int, int]]:
  """(start, stop) of each chunk of a target batch of `batch` images."""
  size = batch if batch_norm else TARGET_CHUNK
  return [(a, min(a + size, batch)) for a in range(0, batch, size)]


@functools.lru_cache(maxsize=16)
def _structured_phases(network_key: tuple, l2_rate: float, flip_support: bool) -> dict:
  """The jitted phases of `structured_step_gradients` for one network and ridge setting."""
  width, depth, w_std, b_std, parameterization, softplus_beta, batch_norm = network_key
  pieces = _feature_losses(width, depth, w_std, b_std, parameterization, softplus_beta,
                           l2_rate, flip_support, batch_norm)
  feature_grad = jax.grad(pieces.feature_loss)  # (phi_S, labels, readout0) -> dF/dphi_S
  add_l2 = lambda g, d: jax.tree_util.tree_map(lambda a, b: a + l2_rate * b, g, d)

  @jax.jit
  def linearise_support(body0, support):
    images, labels = pieces.support_inputs(support)
    return _Linearised(*jax.vjp(lambda p: pieces.body_apply(p, images), body0)), labels

  def inner_grad(lin, delta, labels, readout0, at_zero):
    phi = lin.phi0 if at_zero else lin.phi0 + _jvp(lin, delta)
    return add_l2(lin.vjp(feature_grad(phi, labels, readout0))[0], delta)

  @functools.partial(jax.jit, static_argnames='at_zero')
  def inner_step(lin, delta, state, labels, readout0, lr, at_zero=False):
    """One Adam step of the inner solve; at_zero: delta is known to be 0 (the first step),
    so that J delta = 0 is not computed."""
    return adam_update(inner_grad(lin, delta, labels, readout0, at_zero), state, delta, lr)

  def hvp(lin, phi, x, labels, readout0):
    feature_hvp = jax.jvp(lambda f: feature_grad(f, labels, readout0), (phi,),
                          (_jvp(lin, x),))[1]
    return add_l2(lin.vjp(feature_hvp)[0], x)

  @jax.jit
  def outer(params0, lin, delta, support, labels, log_temp, x_target, y_target, hinv_lr):
    """delta* (the inner solve's delta if it lowered the inner loss below delta = 0's, else
    0, as `tuned_inner_solve`; a NaN counts as not lowered) and whether it did; the outer loss
    and its gradients at delta* (`meta_gradient`'s outer_value_and_grads); the start of the
    Hessian-inverse solve."""
    body0, readout0 = params0
    value = lambda phi, d: (pieces.feature_loss(phi, labels, readout0)
                            + 0.5 * l2_rate * squared_norm(d))
    phi_delta = lin.phi0 + _jvp(lin, delta)
    zero = jax.tree_util.tree_map(jnp.zeros_like, delta)
    improved = value(phi_delta, delta) <= value(lin.phi0, zero)
    delta = jax.tree_util.tree_map(lambda a, b: jnp.where(improved, a, b), delta, zero)
    phi_s = jnp.where(improved, phi_delta, lin.phi0)
    # The target batch linearised in chunks of images (see _target_chunks).
    chunks = _target_chunks(x_target.shape[0], batch_norm)
    targets = [_Linearised(*jax.vjp(lambda p, x=x_target[a:b]: pieces.body_apply(p, x), body0))
               for a, b in chunks]
    phi_t = jnp.concatenate([t.phi0 + _jvp(t, delta) for t in targets])
    (loss, accuracy), (g_t, g_s, g_labels, g_temp) = jax.value_and_grad(
        lambda pt, ps, y, lt: pieces.outer_from_features(pt, ps, y, readout0, lt, y_target),
        argnums=(0, 1, 2, 3), has_aux=True)(phi_t, phi_s, labels, log_temp)
    g_delta = lin.vjp(g_s)[0]
    for t, (a, b) in zip(targets, chunks):
      g_delta = jax.tree_util.tree_map(jnp.add, g_delta, t.vjp(g_t[a:b])[0])
    # The direct gradient: through the support's (mirrored) images and labels at fixed delta.
    _, support_vjp = jax.vjp(lambda s: _support_features(pieces, body0, delta, s), support)
    (direct,) = support_vjp((g_s, g_labels))
    x, step_size, hx = _hinv_start(lambda t: hvp(lin, phi_s, t, labels, readout0), g_delta,
                                   hinv_lr)
    return (delta, improved, phi_s, g_delta, x, step_size, hx,
            (loss, accuracy, g_temp, direct))

  @jax.jit
  def hinv_step(lin, phi, x, state, v, labels, readout0, step_size, hx=None):
    """One Adam step on 0.5 x'Hx - v'x; hx: H x where already known (the first step's, from
    the start's H v by linearity)."""
    if hx is None:
      hx = hvp(lin, phi, x, labels, readout0)
    return adam_update(jax.tree_util.tree_map(jnp.subtract, hx, v), state, x, step_size)

  def finish(body0, readout0, delta, x, support, outer_parts, clip_implicit):
    """The mixed term d/dS <F'(phi_S(S)), J_S(S) x>, and the meta-gradient."""
    loss, accuracy, g_temp, direct = outer_parts

    def coupling(s):
      phi, s_labels = _support_features(pieces, body0, delta, s)
      s_images = pieces.support_inputs(s)[0]
      tangent = jax.jvp(lambda p: pieces.body_apply(p, s_images), (body0,), (x,))[1]
      return _vdot(feature_grad(phi, s_labels, readout0), tangent)

    implicit = jax.tree_util.tree_map(jnp.negative, jax.grad(coupling)(support))
    total = _combine(direct, implicit, clip_implicit)
    return MetaGradient(total, g_temp, loss, accuracy, direct, implicit)

  return {'linearise_support': linearise_support, 'inner_step': inner_step, 'outer': outer,
          'hinv_step': hinv_step,
          'finish': jax.jit(finish, static_argnames='clip_implicit')}


def _support_features(pieces: FeatureLosses, body0: Params, delta: Params,
                      support: Support) -> tuple[jax.Array, jax.Array]:
  """(phi_S = the support's linearised features at delta, the support's labels), with the
  mirrored copies where the losses use them."""
  images, labels = pieces.support_inputs(support)
  return linearized_features(pieces.body_apply, body0, delta, images)[1], labels


def structured_step_gradients(cfg: RcigConfig, params0: Params, support: Support, log_temp,
                              x_target, y_target, inner_lr: float) -> tuple[MetaGradient, float]:
  """`rcig_step_gradients` (the same meta-gradient and next inner learning rate, to float
  rounding) through the linearised body, see above."""
  phases = _structured_phases(_network_key(cfg), cfg.l2_rate, cfg.flip_support)
  body0, readout0 = params0
  lin, labels = phases['linearise_support'](body0, support)
  delta0 = zeros_like_body(params0)
  delta, state = delta0, adam_init(delta0)
  for i in range(cfg.inner_steps):
    delta, state = phases['inner_step'](lin, delta, state, labels, readout0, inner_lr,
                                        at_zero=i == 0)
  delta, improved, phi_s, g_delta, x, step_size, hx, outer_parts = phases['outer'](
      params0, lin, delta, support, labels, log_temp, x_target, y_target, cfg.hinv_lr)
  state = adam_init(x)
  for i in range(cfg.hinv_steps):
    x, state = phases['hinv_step'](lin, phi_s, x, state, g_delta, labels, readout0, step_size,
                                   hx if i == 0 else None)
  meta = phases['finish'](body0, readout0, delta, x, support, outer_parts,
                          clip_implicit=cfg.clip_implicit)
  factor = cfg.inner_lr_increase if bool(improved) else cfg.inner_lr_decrease
  return meta, inner_lr * factor
