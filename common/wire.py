"""The versioned byte format of messages between the coordinator and kernel workers.

A message is a dict whose values are numpy arrays (or numpy scalars, sent as 0-d arrays) and
JSON-able values (numbers, strings, bools, None, lists, dicts). It travels as

  magic b'NTKD' | format version (uint16 LE) | header length (uint32 LE) | header (UTF-8 JSON)
  | zero padding to a multiple of 8 | array data

where the header is {'fields': {...JSON values...}, 'arrays': [{'name', 'dtype', 'shape',
'offset', 'nbytes'}, ...], 'data_nbytes': total} and each array's raw C-order bytes start at
its `offset` (a multiple of 8) into the data section. There is no pickle: decoding never runs
code, and bytes from another version of ntkdd fail with a clear `WireError` instead of a
wrong array. Only bytes cross the RPC boundary because Courier hangs on numpy arguments.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Union

import numpy as np

MAGIC = b'NTKD'
VERSION = 1
_PREFIX = struct.Struct('<4sHI')    # magic, format version, header length
_ALIGN = 8                          # array data starts 8-byte aligned, so views are aligned
_FORBIDDEN_KINDS = ('O', 'V')       # object arrays need pickle; void/structured lose fields

BytesLike = Union[bytes, bytearray, memoryview]

# The `error` field of a kernel worker's failed answer; the coordinator acts on the first two.
STALE_CACHE = 'stale_cache'          # a cache entry (name, version) the worker does not hold
MISSING_DATASET = 'missing_dataset'  # a dataset key the worker does not hold
BAD_REQUEST = 'bad_request'
EXCEPTION = 'exception'


class WireError(ValueError):
  """Bytes that are not a well-formed message of this wire format version."""


def _padding(n: int) -> int:
  return -n % _ALIGN


def _as_array(name: str, value: Any) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype.kind in _FORBIDDEN_KINDS:
    raise WireError(f'Field {name!r} has dtype {array.dtype}, which the wire format cannot '
                    f'carry without pickle; send numeric, bool or string arrays.')
  # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
  return np.require(array, requirements='C')


def encode(message: dict) -> bytes:
  """`message` (str keys; numpy arrays and JSON-able values) as wire bytes."""
  fields, arrays, specs, offset = {}, [], [], 0
  for name, value in message.items():
    if not isinstance(name, str):
      raise WireError(f'Message keys must be strings, got {name!r}.')
    if isinstance(value, (np.ndarray, np.generic)):
      array = _as_array(name, value)
      specs.append({'name': name, 'dtype': array.dtype.str, 'shape': list(array.shape),
                    'offset': offset, 'nbytes': array.nbytes})
      arrays.append(array)
      offset += array.nbytes + _padding(array.nbytes)
    else:
      fields[name] = value
  try:
    header = json.dumps({'fields': fields, 'arrays': specs, 'data_nbytes': offset},
                        separators=(',', ':'), allow_nan=True).encode('utf-8')
  except TypeError as e:
    raise WireError(f'A non-array field is not JSON-serialisable: {e}') from e
  parts = [_PREFIX.pack(MAGIC, VERSION, len(header)), header,
           b'\0' * _padding(_PREFIX.size + len(header))]
  for array in arrays:
    # A flat uint8 view of the C-contiguous array: one copy, straight into the joined bytes.
    parts.append(array.reshape(-1).view(np.uint8))
    parts.append(b'\0' * _padding(array.nbytes))
  return b''.join(parts)


def _read_header(data: memoryview) -> tuple[dict, int]:
  if len(data) < _PREFIX.size:
    raise WireError(f'Truncated message: {len(data)} bytes, shorter than the '
                    f'{_PREFIX.size}-byte prefix.')
  magic, version, header_len = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise WireError(f'Not an ntkdd wire message: magic {bytes(magic)!r}, expected {MAGIC!r}.')
  if version != VERSION:
    raise WireError(f'Wire format version {version}, but this ntkdd reads version {VERSION}; '
                    f'run the same ntkdd version on the coordinator and the workers.')
  header_end = _PREFIX.size + header_len
  if len(data) < header_end:
    raise WireError(f'Truncated message: header needs {header_end} bytes, got {len(data)}.')
  try:
    header = json.loads(bytes(data[_PREFIX.size:header_end]).decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WireError(f'Corrupt message header: {e}') from e
  return header, header_end + _padding(header_end)


def decode(data: BytesLike) -> dict:
  """The message in `data`; arrays are read-only views on `data` (copy to modify)."""
  view = memoryview(data).cast('B')
  header, data_start = _read_header(view)
  expected = data_start + int(header.get('data_nbytes', 0))
  if len(view) != expected:
    kind = 'Truncated' if len(view) < expected else 'Oversized'
    raise WireError(f'{kind} message: header promises {expected} bytes, got {len(view)}.')
  message = dict(header.get('fields', {}))
  for spec in header.get('arrays', []):
    try:
      dtype = np.dtype(spec['dtype'])
      shape = tuple(int(s) for s in spec['shape'])
      start, nbytes = data_start + int(spec['offset']), int(spec['nbytes'])
    except (KeyError, TypeError, ValueError) as e:
      raise WireError(f'Corrupt array description {spec!r}: {e}') from e
    if dtype.kind in _FORBIDDEN_KINDS or nbytes != dtype.itemsize * int(np.prod(shape)):
      raise WireError(f'Corrupt array description {spec!r}.')
    if start + nbytes > len(view):
      raise WireError(f'Truncated message: array {spec["name"]!r} runs past the end.')
    array = np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=start)
    message[spec['name']] = array.view(dtype).reshape(shape)
  return message
