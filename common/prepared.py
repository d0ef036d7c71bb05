"""Datasets in model space: load, pool and preprocess once per process, keyed by content.

The coordinator and every kernel worker prepare the same `DataSpec` themselves (each from its
own data dir), so that the coordinator can name target images by index. Each split's content
fingerprint (`PreparedData.key`) tells whether two processes really hold the same images:
different files, versions or preprocessing give different keys, and the coordinator then
sends pixels instead of indices.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Optional

import numpy as np

from ntkdd.common import choices, data, preprocess, sources

SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where a dataset comes from and how it is turned into model-space images."""
  dataset: str
  data_dir: str = 'data'
  cache_dir: Optional[str] = None
  download: bool = False
  image_size: Optional[int] = None   # average-pool images down to this side
  preprocess: str = 'auto'           # auto: per-channel standardisation (see prepare)
  zca_strength: float = 0.1

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> 'DataSpec':
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class PreparedData:
  """Train/test images in model space, with labels, ready for distillation."""
  dataset: data.Dataset
  preprocessor: preprocess.Preprocessor
  x_train: np.ndarray
  y_train: np.ndarray            # int class ids
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  _keys: dict = dataclasses.field(default_factory=dict, repr=False)

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS:
      raise ValueError(f'Unknown split {name!r}: choose one of {SPLITS}.')
    return self.x_train if name == 'train' else self.x_test

  def key(self, name: str) -> str:
    """The content fingerprint of split `name`'s model-space images (computed once)."""
    if name not in self._keys:
      self._keys[name] = f'{name}:{sources.fingerprint(self.split(name))}'
    return self._keys[name]

  def rows(self, name: str, indices=None) -> sources.DatasetRows:
    """Rows of split `name` (all if `indices` is None) that kernel workers holding this data
    can look up by index."""
    if indices is None:
      images = self.split(name)
      return sources.DatasetRows(images, self.key(name), np.arange(len(images)))
    return sources.dataset_rows(self.split(name), self.key(name), indices)


def downsample(x: np.ndarray, size: int) -> np.ndarray:
  """Average-pools NHWC images to size x size (the side must divide evenly)."""
  h = x.shape[1]
  if size == h:
    return x
  if h % size or x.shape[2] % size:
    raise ValueError(f'--image-size {size} must divide the image side {h}x{x.shape[2]} '
                     f'(e.g. {h // 2}).')
  f = h // size
  n, _, w, c = x.shape
  return x.reshape(n, size, f, w // f, f, c).mean(axis=(2, 4)).astype(x.dtype)


def prepare_uncached(spec: DataSpec) -> PreparedData:
  dataset = data.load_dataset(spec.dataset, spec.data_dir, cache_dir=spec.cache_dir,
                              download=spec.download)
  x_train, x_test = dataset.x_train, dataset.x_test
  if spec.image_size:
    x_train, x_test = downsample(x_train, spec.image_size), downsample(x_test, spec.image_size)
  kind = spec.preprocess
  if kind == 'auto':
    # What 'auto' meant before `ntkdd distill` chose per kernel family (and still means in a
    # DistillConfig and in older runs' config.json): runs resume on the data they were made on.
    kind = choices.LEGACY_AUTO_PREPROCESS
  logging.info('Preprocessing %s with %s.', dataset.name, kind)
  pre = preprocess.make_preprocessor(kind, x_train, spec.zca_strength)
  return PreparedData(dataset=dataset, preprocessor=pre, x_train=pre.apply(x_train),
                      y_train=np.asarray(dataset.y_train), x_test=pre.apply(x_test),
                      y_test=np.asarray(dataset.y_test), num_classes=dataset.num_classes)


_MEMO: dict[Any, PreparedData] = {}
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 2


def _source_stamp(spec: DataSpec) -> tuple:
  """(size, mtime) of the dataset's file or folder, so an edited file is prepared anew."""
  for path in (spec.dataset, os.path.join(spec.data_dir, spec.dataset), spec.data_dir):
    try:
      st = os.stat(path)
      return (path, st.st_size, st.st_mtime_ns)
    except OSError:
      continue
  return ()


def prepare(spec: DataSpec) -> PreparedData:
  """`spec`'s data in model space; shared within a process (in-process workers, coordinator)."""
  memo_key = (spec, _source_stamp(spec))
  with _MEMO_LOCK:
    found = _MEMO.get(memo_key)
    if found is not None:
      return found
    result = prepare_uncached(spec)
    while len(_MEMO) >= _MEMO_SIZE:
      _MEMO.pop(next(iter(_MEMO)))
    _MEMO[memo_key] = result
    return result
