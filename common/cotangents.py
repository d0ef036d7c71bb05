"""Low-rank cotangents: a vjp's cotangent matrix as factors, its blocks and its packed form.

KIP's cotangent on K(support, [support; targets]) has rank 2 C (C classes) plus a multiple of
the identity (common/krr.py `kip_cotangent_factors`), so at hundreds of workers the
coordinator sends its factors once instead of the (n_s, n_s + n_t) matrix block by block,
and whoever computes a block forms its cotangent (`LowRankCotangent.block`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LowRankCotangent(NamedTuple):
  """G = left @ right.T + diagonal * I, the identity on G's leading min(n1, n2) square.

  left: (n1, q) float64; right: (n2, q) float64; diagonal: a float.
  """
  left: np.ndarray
  right: np.ndarray
  diagonal: float

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self.left), len(self.right))

  def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """G[r0:r1, c0:c1] in float64."""
    out = self.left[r0:r1] @ self.right[c0:c1].T
    lo, hi = max(r0, c0), min(r1, c1, *self.shape)   # the identity's part inside the block
    if lo < hi:
      at = np.arange(lo, hi)
      out[at - r0, at - c0] += self.diagonal
    return out

  def dense(self) -> np.ndarray:
    """The whole (n1, n2) matrix in float64."""
    return self.block(0, self.shape[0], 0, self.shape[1])


def pack(g: LowRankCotangent) -> np.ndarray:
  """One float64 array (n1 + n2 + 1, q): left's rows, right's, then [diagonal, 0, ...]
  (what a worker caches: one array under one name and version)."""
  q = g.left.shape[1]
  if g.right.ndim != 2 or g.right.shape[1] != q or g.left.ndim != 2:
    raise ValueError(f'left and right must be (n, q) with the same q, got {g.left.shape} and '
                     f'{g.right.shape}.')
  last = np.zeros((1, max(q, 1)), np.float64)
  last[0, 0] = g.diagonal
  body = np.concatenate([g.left, g.right]).astype(np.float64, copy=False)
  if q == 0:   # rank 0: only the diagonal
    body = np.zeros((len(body), 1), np.float64)
  return np.concatenate([body, last])


def unpack(packed: np.ndarray, n1: int) -> LowRankCotangent:
  """`pack`'s inverse, given the rows n1 of G; views on `packed`, no copy.

  Raises:
    ValueError: `packed` is not a 2-d float64 array with more than n1 rows.
  """
  if not (isinstance(packed, np.ndarray) and packed.ndim == 2 and packed.dtype == np.float64
          and 0 <= n1 < len(packed)):
    raise ValueError(f'packed cotangent factors must be a 2-d float64 array of more than {n1} '
                     f'rows, got {getattr(packed, "dtype", None)} {getattr(packed, "shape", None)}.')
  return LowRankCotangent(packed[:n1], packed[n1:-1], float(packed[-1, 0]))
