"""Support sets made by other code: the RCIG and FRePo checkpoints (flax msgpack state dicts).

Both codes save their distilled set with `flax.training.checkpoints.save_checkpoint`: a file
`checkpoint_<step>` holding the msgpack of the train state's state dict, whose `params` and
`ema_average` entries are dicts with `x_proto` (images, NHWC, in that code's preprocessed
space) and `y_proto` (labels, (n, C), one-hot minus 1/C at the start, learned after). RCIG's
evaluation reads the `ema_average` copy, and so do we where the checkpoint has one. flax writes
numpy arrays as msgpack extension type 1 (and numpy scalars as type 3), whose payload is itself
the msgpack of (shape, dtype name, C-order bytes); arrays over 2^30 bytes are split into a
dict of flat chunks. This module reads that with the `msgpack` package alone (no flax):
`pip install msgpack` or `pip install ntkdd[foreign]`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ntkdd.common import optional

_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
_CHUNKED = '__msgpack_chunked_array__'
# Where a set lies in the state dict, in the order looked at: the EMA the papers evaluate, then
# the raw parameters; each possibly under a further 'params' (a flax variables dict).
_PLACES = (('ema_average',), ('ema_average', 'params'), ('params',), ('params', 'params'), ())


def _import_msgpack():
  return optional.require('msgpack', 'Reading RCIG/FRePo checkpoints', 'foreign')


def is_flax_checkpoint(path: str | Path) -> bool:
  """Whether `path` looks like a flax msgpack checkpoint (or a folder of them) rather than an
  .npz: a folder with checkpoint_* files, or a file starting with a msgpack map."""
  path = Path(path)
  if path.is_dir():
    return any(path.glob('checkpoint_*'))
  if not path.is_file():
    return False
  with open(path, 'rb') as f:
    head = f.read(1)
  # fixmap (0x80-0x8f), map16 (0xde) or map32 (0xdf); an .npz is a zip (b'PK').
  return bool(head) and (0x80 <= head[0] <= 0x8f or head[0] in (0xde, 0xdf))


def checkpoint_file(path: str | Path) -> Path:
  """The checkpoint file itself: `path`, or in a folder the last of its checkpoint_<step>
  files (`checkpoint_final` before any number)."""
  path = Path(path)
  if not path.is_dir():
    return path
  candidates = [p for p in path.glob('checkpoint_*') if p.is_file()]
  final = [p for p in candidates if p.name == 'checkpoint_final']
  if final:
    return final[0]
  numbered = [(int(m.group(1)), p) for p in candidates
              if (m := re.fullmatch(r'checkpoint_(\d+)', p.name))]
  if not numbered:
    raise FileNotFoundError(f'{path} holds no checkpoint_<step> file of the RCIG/FRePo code.')
  return max(numbered)[1]


def _array_from_payload(msgpack, data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  if isinstance(dtype_name, bytes):
    dtype_name = dtype_name.decode()
  return np.frombuffer(buffer, dtype=np.dtype(dtype_name)).reshape(shape)


def _join_chunks(tree: Any) -> Any:
  """Replaces flax's chunked-array dicts by the arrays they hold."""
  if not isinstance(tree, dict):
    return tree
  if tree.get(_CHUNKED):
    shape = tuple(tree['shape'][str(i)] for i in range(len(tree['shape'])))
    chunks = [tree['chunks'][str(i)] for i in range(len(tree['chunks']))]
    return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
  return {key: _join_chunks(value) for key, value in tree.items()}


def read_state_dict(path: str | Path) -> dict:
  """The state dict of a flax msgpack checkpoint, numpy arrays as leaves."""
  msgpack = _import_msgpack()

  def ext_hook(code, data):
    if code == _NDARRAY:
      return _array_from_payload(msgpack, data)
    if code == _NPSCALAR:
      return _array_from_payload(msgpack, data)[()]
    if code == _COMPLEX:
      real, imag = msgpack.unpackb(data)
      return complex(real, imag)
    return msgpack.ExtType(code, data)

  raw = Path(path).read_bytes()
  try:
    state = msgpack.unpackb(raw, ext_hook=ext_hook, raw=False, strict_map_key=False)
  except (ValueError, msgpack.exceptions.ExtraData) as e:
    raise ValueError(f'{path} is not a flax msgpack checkpoint ({e}).') from e
  if not isinstance(state, dict):
    raise ValueError(f'{path} holds a msgpack {type(state).__name__}, not a flax state dict.')
  return _join_chunks(state)


def find_support(state: dict) -> tuple[np.ndarray, np.ndarray, str]:
  """(x_proto, y_proto, where they were found) from a state dict, the `ema_average` copy
  first."""
  for place in _PLACES:
    node = state
    for key in place:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and 'x_proto' in node:
      if 'y_proto' not in node:
        raise ValueError(f"The checkpoint's {'/'.join(place) or 'top level'} has x_proto but "
                         f'no y_proto.')
      return np.asarray(node['x_proto']), np.asarray(node['y_proto']), '/'.join(place)
  raise ValueError(f'No x_proto/y_proto in the checkpoint (top-level keys: {sorted(state)}); '
                   f'is it a checkpoint of the RCIG or FRePo distillation code?')


def load_flax_support(path: str | Path, image_shape: tuple,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(images, labels, label_ids, place) of an RCIG/FRePo checkpoint, checked against the
  dataset's preprocessed image shape and class count. The images stay in the space the code
  made them in: evaluate them on a test split preprocessed the same way."""
  file = checkpoint_file(path)
  images, labels, place = find_support(read_state_dict(file))
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != tuple(image_shape):
    raise ValueError(f'{file}: x_proto has shape {images.shape}, but the dataset after '
                     f'preprocessing has images of shape {tuple(image_shape)}; use the dataset '
                     f'(and --image-size) the set was distilled on.')
  labels = np.asarray(labels, np.float32)
  if labels.shape != (len(images), num_classes):
    raise ValueError(f'{file}: y_proto has shape {labels.shape}, expected ({len(images)}, '
                     f'{num_classes}) for {num_classes} classes.')
  if not np.all(np.isfinite(images)) or not np.all(np.isfinite(labels)):
    raise ValueError(f'{file} holds NaN or inf values in x_proto/y_proto.')
  return images, labels, np.argmax(labels, axis=1).astype(np.int32), place
