"""Kernel ridge regression: the KIP losses, their closed-form cotangents, Label Solve, accuracy.

Everything here acts on the small matrices (K_ss: n_s x n_s, K_ts: n_t x n_s) in float64
numpy. The loss reaches the kernel only through the cotangents dL/dK_ss and dL/dK_ts, which
the kernel workers pull back to the support images tile by tile. Both losses (`LOSSES`) are
functions of the KRR predictions P = K_ts A^-1 y_s alone, so they share every formula after
dL/dP.

Regularisation follows the KIP papers: K_ss + lambda * tr(K_ss) / n_s * I.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from ntkdd.common import cotangents
from ntkdd.common.choices import KIP_LOSSES as LOSSES


class KrrGradients(NamedTuple):
  """The KIP loss on one target batch and its gradients with respect to the small matrices."""
  loss: float
  predictions: np.ndarray   # (n_t, C)
  d_k_ss: Optional[np.ndarray]   # (n_s, n_s), as a cotangent of the symmetric matrix K_ss
  d_k_ts: Optional[np.ndarray]   # (n_t, n_s); both None if not asked for (`dense`)
  d_y_s: np.ndarray         # (n_s, C)
  alpha: Optional[np.ndarray] = None      # (n_s, C): A^-1 y_s
  # (n_t, C): dL/d predictions; for the MSE loss the residual predictions - y_t (its name).
  residual: Optional[np.ndarray] = None
  d_log_temperature: float = 0.0          # the Platt loss's; 0 for MSE


def _check_reg(reg: float) -> None:
  if not reg > 0:
    raise ValueError(f'The ridge regulariser must be > 0 (got {reg}); the papers use 1e-6.')


def regularized(k_ss: np.ndarray, reg: float) -> np.ndarray:
  """K_ss + reg * tr(K_ss) / n * I."""
  _check_reg(reg)
  k_ss = np.asarray(k_ss, np.float64)
  n = k_ss.shape[0]
  return k_ss + (reg * np.trace(k_ss) / n) * np.eye(n)


def _regularized_finite(k_ss: np.ndarray, reg: float) -> np.ndarray:
  """`regularized`, refused with FloatingPointError if it has NaN or inf entries."""
  a = regularized(k_ss, reg)
  if not np.all(np.isfinite(a)):
    raise FloatingPointError('The support kernel K_ss has NaN or inf entries.')
  return a


def solve(k_ss: np.ndarray, rhs: np.ndarray, reg: float, method: str = 'cholesky') -> np.ndarray:
  """(K_ss + reg tr(K_ss)/n I)^-1 rhs; least squares where the matrix is numerically singular.

  Args:
    k_ss, rhs, reg: the support kernel, the right-hand side(s), the ridge lambda.
    method: 'cholesky' (a Cholesky factor, then two general solves with it: the path every
      KIP and LS result so far was made with, kept for their bits; falls back where not
      positive definite) or 'lu' (one LAPACK gesv: ~3x less CPU at 500 support images, equal
      to float64 rounding; the fused KIP step's, which runs on the coordinator between rounds).
  """
  a = _regularized_finite(k_ss, reg)
  rhs = np.asarray(rhs, np.float64)
  if method not in ('cholesky', 'lu'):
    raise ValueError(f"krr.solve: method must be 'cholesky' or 'lu', got {method!r}.")
  try:
    if method == 'lu':
      return np.linalg.solve(a, rhs)
    chol = np.linalg.cholesky(a)
    return np.linalg.solve(chol.T, np.linalg.solve(chol, rhs))
  except np.linalg.LinAlgError:
    # Numerically indefinite (tiny reg, near-duplicate supports): least squares is still stable.
    return np.linalg.lstsq(a, rhs, rcond=None)[0]


def inverse(k_ss: np.ndarray, reg: float) -> np.ndarray:
  """(K_ss + reg tr(K_ss)/n I)^-1, for many right-hand sides known later: one matrix product
  each instead of a solve (the overlapped KIP step computes it while its round runs, so beta
  costs ~0.2 ms between rounds instead of ~5 ms at 500 support images). Equal to `solve` to
  float64 rounding (the regularised matrix is well conditioned: reg tr/n on its diagonal)."""
  a = _regularized_finite(k_ss, reg)
  try:
    return np.linalg.inv(a)
  except np.linalg.LinAlgError:   # numerically singular: the least-squares inverse
    return np.linalg.pinv(a)


def predict(k_ts: np.ndarray, k_ss: np.ndarray, y_s: np.ndarray, reg: float) -> np.ndarray:
  """KRR predictions K_ts (K_ss + reg tr(K_ss)/n I)^-1 y_s."""
  return np.asarray(k_ts, np.float64) @ solve(k_ss, y_s, reg)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows whose argmax equals the integer label."""
  return float(np.mean(np.argmax(predictions, axis=-1) == np.asarray(labels)))


def check_loss(loss: str) -> None:
  """Raises ValueError unless `loss` is one of `LOSSES`."""
  if loss not in LOSSES:
    raise ValueError(f'The KIP loss must be one of {LOSSES}, got {loss!r}.')


def platt_loss(predictions: np.ndarray, y_t: np.ndarray, log_temperature: float) -> tuple:
  """Platt scaling's loss: the cross-entropy of softmax(exp(t) P), summed over the targets.

  The target classes are the argmax of y_t's rows (one-hot minus 1/C). RFAD (Loo et al. 2022)
  distils with it: unlike the squared error it does not ask the 1-of-C predictions to hit
  -1/C and 1 - 1/C exactly, only to rank the right class first with a margin.

  Args:
    predictions: (n_t, C) KRR predictions P.
    y_t: (n_t, C) target labels.
    log_temperature: t; the logits are exp(t) P.

  Returns:
    (loss, dL/dP (n_t, C), dL/dt).
  """
  temperature = float(np.exp(log_temperature))
  logits = temperature * predictions
  shifted = logits - np.max(logits, axis=1, keepdims=True)
  log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
  classes = np.argmax(y_t, axis=1)
  rows = np.arange(len(classes))
  loss = -float(np.sum(log_probs[rows, classes]))
  d_logits = np.exp(log_probs)
  d_logits[rows, classes] -= 1.0
  return loss, temperature * d_logits, float(np.sum(d_logits * logits))


def loss_and_gradients(k_ss: np.ndarray, k_ts: np.ndarray, y_s: np.ndarray, y_t: np.ndarray,
                       reg: float, dense: bool = True, loss: str = 'mse',
                       log_temperature: float = 0.0) -> KrrGradients:
  """A KIP loss of the predictions P = K_ts A^-1 y_s, A = K_ss + reg tr(K_ss)/n I, and its
  gradients.

  loss 'mse': 1/2 ||y_t - P||^2; 'platt': `platt_loss` at `log_temperature`. With
  alpha = A^-1 y_s, r = dL/dP (MSE: P - y_t) and beta = A^-1 K_ts^T r:
    dL/dK_ts = r alpha^T,   dL/dy_s = beta,
    dL/dA = -beta alpha^T,  dL/dK_ss = dL/dA + (reg/n) tr(dL/dA) I.
  `dense` False leaves d_k_ss and d_k_ts None (for `kip_cotangent_factors`, which needs
  alpha and r only: the (n_t, n_s) outer product is most of this function's memory traffic).
  """
  check_loss(loss)
  k_ts = np.asarray(k_ts, np.float64)
  y_t = np.asarray(y_t, np.float64)
  n = k_ss.shape[0]
  alpha = solve(k_ss, y_s, reg)
  predictions = k_ts @ alpha
  d_log_temperature = 0.0
  if loss == 'mse':
    residual = predictions - y_t
    value = 0.5 * float(np.sum(residual * residual))
  else:
    value, residual, d_log_temperature = platt_loss(predictions, y_t, log_temperature)
  beta = solve(k_ss, k_ts.T @ residual, reg)
  if not dense:
    return KrrGradients(loss=value, predictions=predictions, d_k_ss=None, d_k_ts=None,
                        d_y_s=beta, alpha=alpha, residual=residual,
                        d_log_temperature=d_log_temperature)
  d_a = -beta @ alpha.T
  d_k_ss = d_a + (reg / n) * np.trace(d_a) * np.eye(n)
  return KrrGradients(loss=value, predictions=predictions, d_k_ss=d_k_ss,
                      d_k_ts=residual @ alpha.T, d_y_s=beta, alpha=alpha, residual=residual,
                      d_log_temperature=d_log_temperature)


def kip_cotangent_factors(g: KrrGradients, reg: float) -> cotangents.LowRankCotangent:
  """KIP's cotangent on K(support, [support; targets]) as low-rank factors.

  The dense cotangent (common/kip.py) is [dL/dK_ss + dL/dK_ss^T, dL/dK_ts^T]. From
  `loss_and_gradients`' formulas, with d_a = -beta alpha^T and t = tr(d_a) = -sum(beta * alpha):
    dL/dK_ss + dL/dK_ss^T = -(beta alpha^T + alpha beta^T) + 2 (reg/n) t I,
    dL/dK_ts^T = alpha r^T,
  i.e. left = [alpha, beta], right = [[-beta, -alpha]; [r, 0]] and diagonal 2 (reg/n) t: rank
  2 C, (n_s + n_s + n_t) x 2 C numbers instead of n_s x (n_s + n_t). Equal to the dense
  cotangent up to float64 rounding (the sums run in another order).

  Args:
    g: `loss_and_gradients`' result (its alpha and residual).
    reg: the ridge lambda it was computed with.

  Returns:
    The (n_s, n_s + n_t) cotangent's factors.
  """
  alpha, beta, residual = g.alpha, g.d_y_s, g.residual
  n = len(alpha)
  trace = -float(np.sum(beta * alpha))
  left = np.concatenate([alpha, beta], axis=1)
  right = np.concatenate([np.concatenate([-beta, -alpha], axis=1),
                          np.concatenate([residual, np.zeros_like(residual)], axis=1)])
  return cotangents.LowRankCotangent(left, right, 2 * (reg / n) * trace)


def label_solve(k_ss: np.ndarray, k_ts: np.ndarray, y_t: np.ndarray, reg: float,
                rcond: Optional[float] = 1e-6) -> np.ndarray:
  """Label Solve: the least-norm y_s minimising ||y_t - K_ts A^-1 y_s||, i.e. (K_ts A^-1)^+ y_t.

  `rcond` is the pseudo-inverse cut-off: singular values of K_ts A^-1 below rcond times the
  largest are treated as zero (directions the targets cannot determine get no label mass).
  """
  k_ts = np.asarray(k_ts, np.float64)
  # K_ts A^-1 = (A^-1 K_ts^T)^T since A is symmetric.
  design = solve(k_ss, k_ts.T, reg).T
  return np.linalg.lstsq(design, np.asarray(y_t, np.float64), rcond=rcond)[0]
