"""KIP and Label Solve as computations over a kernel backend's blocks (no RPC knowledge).

A *kernel backend* is anything with (x2 an array, or `common/sources` rows/parts that say
where the images came from)
  `kernel(x1, x2=None) -> {'ntk': (n1, n2), 'nngp': (n1, n2)}` (x2 None: K(x1, x1)) and
  `vjp(x1, x2, g_ntk, g_nngp) -> d/dx1 of <g_ntk, NTK(x1, x2)> + <g_nngp, NNGP(x1, x2)>`.
In one process it calls the kernel engine directly; distributed, the coordinator tiles these
calls over workers. The KRR loss touches the kernel only through the cotangents dL/dK_ss and
dL/dK_ts, so a KIP step is: one forward round (K_ss, K_st), the closed-form cotangents on the
small matrices, one vjp round.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Sequence

import numpy as np

from ntkdd.common import krr, sources
from ntkdd.common.choices import KERNELS


class KernelBackend(Protocol):
  """Optional attributes: `one_kernel` (kernel() takes `names`, the kernels to compute),
  `cotangent_factors` (vjp() takes a `cotangents.LowRankCotangent` for g_ntk / g_nngp) and
  `fused_step` (a `kip_step` method computes the whole KIP step, server/fused_step.py; None
  from it: use the two rounds)."""

  def kernel(self, x1: np.ndarray, x2: Optional[np.ndarray] = None) -> dict: ...

  def vjp(self, x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray],
          g_nngp: Optional[np.ndarray]) -> np.ndarray: ...


class KipStep(NamedTuple):
  loss: float
  grad_images: np.ndarray      # dL/d support_images
  grad_labels: np.ndarray      # dL/d support_labels
  target_accuracy: float       # KRR accuracy on the target batch, before the update
  grad_log_temperature: float = 0.0   # the Platt loss's temperature (0 for MSE)


def _cotangents(kernel_name: str, g: np.ndarray) -> tuple:
  if kernel_name not in KERNELS:
    raise ValueError(f'kernel must be one of {KERNELS}, got {kernel_name!r}.')
  return (g, None) if kernel_name == 'ntk' else (None, g)


def _asked_kernel(backend: KernelBackend, x1: np.ndarray, x2, kernel_name: str) -> np.ndarray:
  """K(x1, x2) of `kernel_name`; a backend with `one_kernel` set computes only that one
  (half the answer bytes of a distributed round), the others both."""
  if getattr(backend, 'one_kernel', False):
    return backend.kernel(x1, x2, names=(kernel_name,))[kernel_name]
  return backend.kernel(x1, x2)[kernel_name]


def krr_between_rounds(k_s_all: np.ndarray, support_labels: np.ndarray,
                       target_labels: np.ndarray, reg: float, factored: bool,
                       loss: str = 'mse', log_temperature: float = 0.0) -> tuple:
  """What a KIP step computes between its kernel and vjp rounds (bench/krr_step.py times it).

  Args:
    k_s_all: K(support, [support; targets]), (n_s, n_s + n_t).
    support_labels, target_labels: (n_s, C) and (n_t, C).
    reg: the ridge lambda.
    factored: return the vjp's cotangent as low-rank factors (workers form the blocks).
    loss, log_temperature: the loss on the predictions (`krr.LOSSES`) and the Platt loss's
      log temperature.

  Returns:
    (`krr.KrrGradients`, the cotangent on k_s_all: dense (n_s, n_s + n_t) or factors).
  """
  n_s = len(support_labels)
  k_ss, k_st = k_s_all[:, :n_s], k_s_all[:, n_s:]
  k_ss = 0.5 * (k_ss + k_ss.T)  # exact symmetry for the solve
  g = krr.loss_and_gradients(k_ss, k_st.T, support_labels, target_labels, reg,
                             dense=not factored, loss=loss, log_temperature=log_temperature)
  if not np.isfinite(g.loss):
    raise FloatingPointError('The KIP loss is NaN or inf.')
  if factored:   # its workers form the blocks
    return g, krr.kip_cotangent_factors(g, reg)
  # K_ss moves with both of its arguments: <G, K(x, x)> pulls back as vjp_x1(G + G^T).
  return g, np.concatenate([g.d_k_ss + g.d_k_ss.T, g.d_k_ts.T], axis=1)


def kip_gradients(backend: KernelBackend, support_images: np.ndarray,
                  support_labels: np.ndarray, target_images: np.ndarray,
                  target_labels: np.ndarray, target_label_ids: np.ndarray,
                  kernel_name: str = 'ntk', reg: float = 1e-6, loss: str = 'mse',
                  log_temperature: float = 0.0) -> KipStep:
  """Loss and gradients of a KIP loss for one batch: 1/2 ||y_t - K_ts (K_ss + reg tr/n I)^-1
  y_s||^2 ('mse'), or the Platt loss of those predictions at `log_temperature` ('platt'; see
  `krr.platt_loss`). The fused step (server/fused_step.py) computes the MSE loss only: with the
  Platt loss a fused backend runs the two rounds."""
  krr.check_loss(loss)
  if getattr(backend, 'fused_step', False) and loss == 'mse':   # no barrier between the rounds
    fused = backend.kip_step(support_images, target_images, support_labels, target_labels,
                             reg, kernel_name)
    if fused is not None:
      g, grad_images = fused
      return KipStep(loss=g.loss, grad_images=grad_images, grad_labels=g.d_y_s,
                     target_accuracy=krr.accuracy(g.predictions, target_label_ids))
  # Kept as parts: a distributed backend sends target rows as dataset indices.
  both = sources.concat([support_images, target_images])
  k_s_all = _asked_kernel(backend, support_images, both, kernel_name)
  g, cotangent = krr_between_rounds(k_s_all, support_labels, target_labels, reg,
                                    getattr(backend, 'cotangent_factors', False), loss,
                                    log_temperature)
  grad_images = backend.vjp(support_images, both, *_cotangents(kernel_name, cotangent))
  return KipStep(loss=g.loss, grad_images=grad_images, grad_labels=g.d_y_s,
                 target_accuracy=krr.accuracy(g.predictions, target_label_ids),
                 grad_log_temperature=g.d_log_temperature)


def krr_accuracy(backend: KernelBackend, support_images: np.ndarray,
                 support_labels: np.ndarray, test_images: np.ndarray, test_label_ids: np.ndarray,
                 kernel_name: str = 'ntk', reg: float = 1e-6, chunk: int = 2000) -> float:
  """KRR test accuracy of a support set, kernels computed in chunks of test images."""
  return krr_accuracies(backend, support_images, [support_labels], test_images, test_label_ids,
                        kernel_name, reg, chunk)[0]


def krr_accuracies(backend: KernelBackend, support_images: np.ndarray,
                   label_sets: Sequence[np.ndarray], test_images: np.ndarray,
                   test_label_ids: np.ndarray, kernel_name: str = 'ntk', reg: float = 1e-6,
                   chunk: int = 2000) -> list[float]:
  """KRR test accuracies of one set of support images under several label sets.

  The kernels depend on the images only, so they are computed once for all label sets (Label
  Solve's before and after: half the kernel pairs of two `krr_accuracy` calls).

  Args:
    backend: the kernel backend.
    support_images: (n_s, ...) support images.
    label_sets: label matrices (n_s, C), one per accuracy wanted.
    test_images, test_label_ids: the test images and their class ids.
    kernel_name: 'ntk' or 'nngp'. reg: the ridge lambda.
    chunk: test images per kernel call.

  Returns:
    One accuracy per label set, in order.
  """
  k_ss = backend.kernel(support_images)[kernel_name]
  alphas = [krr.solve(k_ss, labels, reg) for labels in label_sets]
  correct = [0] * len(alphas)
  for start in range(0, len(test_images), chunk):
    k_st = backend.kernel(support_images, test_images[start:start + chunk])[kernel_name]
    ids = test_label_ids[start:start + chunk]
    for i, alpha in enumerate(alphas):
      correct[i] += int(np.sum(np.argmax(k_st.T @ alpha, -1) == ids))
  return [c / len(test_images) for c in correct]


def label_solve(backend: KernelBackend, support_images: np.ndarray, target_images: np.ndarray,
                target_labels: np.ndarray, kernel_name: str = 'ntk', reg: float = 1e-6,
                rcond: float = 1e-6, chunk: int = 2000) -> np.ndarray:
  """LS: support labels minimising the KRR loss over the whole target set, least-norm."""
  k_ss = backend.kernel(support_images)[kernel_name]
  k_ts = np.concatenate(
      [backend.kernel(support_images, target_images[s:s + chunk])[kernel_name].T
       for s in range(0, len(target_images), chunk)], axis=0)
  return krr.label_solve(0.5 * (k_ss + k_ss.T), k_ts, target_labels, reg, rcond)
