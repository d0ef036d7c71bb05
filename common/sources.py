"""Image arrays that say where they came from, so a distributed backend can send indices.

A KIP step's kernel columns are [support images; target batch]. The target batch is a set of
rows of the training split, which every kernel worker can hold itself: sending its indices
costs 8 bytes an image instead of the pixels. `DatasetRows` carries both the images (for
backends that compute here, and as the fallback for a worker without the data) and the
(split key, indices) that name them; `Concat` keeps the parts of a column set apart so the
coordinator can plan blocks per part. Both behave as arrays where an array is needed
(`np.asarray`, `len`, `.shape`), so in-process backends need not know about them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetRows:
  """Rows `indices` of a prepared split whose content fingerprint is `key`, and their images."""
  images: np.ndarray
  key: str
  indices: np.ndarray

  def __post_init__(self):
    indices = np.asarray(self.indices, np.int64)
    if indices.shape != (len(self.images),):
      raise ValueError(f'DatasetRows: {len(self.images)} images but indices of shape '
                       f'{indices.shape}.')
    object.__setattr__(self, 'indices', indices)

  def __len__(self) -> int:
    return len(self.images)

  @property
  def shape(self) -> tuple:
    return self.images.shape

  @property
  def dtype(self) -> np.dtype:
    return self.images.dtype

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return self.images if dtype is None else self.images.astype(dtype, copy=False)

  def __getitem__(self, selection) -> 'DatasetRows':
    """Rows by slice or index array; still named by the split's indices."""
    if isinstance(selection, (int, np.integer)):
      selection = slice(int(selection), int(selection) + 1)
    return DatasetRows(self.images[selection], self.key, self.indices[selection])


def dataset_rows(split_images: np.ndarray, key: str, indices) -> DatasetRows:
  """The rows `indices` of a split (`split_images`, fingerprint `key`)."""
  indices = np.asarray(indices, np.int64)
  return DatasetRows(split_images[indices], key, indices)


Part = Union[np.ndarray, DatasetRows]


@dataclasses.dataclass(frozen=True, eq=False)
class Concat:
  """Parts stacked along the first axis, kept apart; `np.asarray` concatenates them."""
  parts: tuple

  def __len__(self) -> int:
    return sum(len(p) for p in self.parts)

  @property
  def shape(self) -> tuple:
    return (len(self),) + tuple(self.parts[0].shape[1:])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.concatenate([np.asarray(p) for p in self.parts], axis=0)
    return out if dtype is None else out.astype(dtype, copy=False)

  def offsets(self) -> list[tuple[int, Part]]:
    """(first row, part) of every non-empty part."""
    out, start = [], 0
    for part in self.parts:
      if len(part):
        out.append((start, part))
      start += len(part)
    return out


def concat(parts: Sequence[Part]) -> Union[np.ndarray, Concat]:
  """The parts stacked: a plain array when none is `DatasetRows`, else a `Concat`."""
  if any(isinstance(p, (DatasetRows, Concat)) for p in parts):
    flat = []
    for p in parts:
      flat.extend(p.parts if isinstance(p, Concat) else [p])
    return Concat(tuple(flat))
  return np.concatenate(parts, axis=0)


def parts_of(x) -> list[tuple[int, Part]]:
  """(first row, part) of x's pieces: a Concat's parts, else x itself as one part."""
  if isinstance(x, Concat):
    return x.offsets()
  return [(0, x)] if len(x) else []


def as_array(x, dtype=None) -> np.ndarray:
  """Plain images of an array, `DatasetRows` or `Concat`."""
  return np.asarray(x) if dtype is None else np.asarray(x, dtype)


def fingerprint(array: np.ndarray) -> str:
  """A content key of an array (dtype, shape, bytes): equal keys mean equal arrays."""
  import hashlib
  array = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder('<'))
  digest = hashlib.blake2b(digest_size=16)
  digest.update(f'{array.dtype.str}{array.shape}'.encode())
  digest.update(memoryview(array).cast('B'))
  return digest.hexdigest()
