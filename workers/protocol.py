"""The kernel worker protocol: its methods, error codes, `WorkerHandle` and the wire format.

A kernel worker (workers/kernel_worker.py) serves four methods, whatever carries the calls
(a direct call in this process, Courier under Launchpad, a Ray actor call): `ping`,
`set_images`, `kernel_block` and `vjp_block` (plus `cached_images` and `fetch_images` between
peers, for the tree broadcast; `group_blocks` for group requests, with the options named
after METHODS below: VJP_FACTORS, FACTOR_CACHES, KERNELS_FIELD, FEATURES). Arguments are
bytes, ints and strs only (Courier hangs on numpy arrays), and every answer is a wire
message as bytes. `WorkerHandle` is how the coordinator holds one worker; every launch
type's handle subclasses it.

The wire format: a message is a dict whose values are numpy arrays (or numpy scalars, sent as
0-d arrays) and JSON-able values (numbers, strings, bools, None, lists, dicts). It travels as

  magic b'NTKD' | format version (uint16 LE) | header length (uint32 LE) | header (UTF-8 JSON)
  | zero padding to a multiple of 8 | array data

where the header is {'fields': {...JSON values...}, 'arrays': [{'name', 'dtype', 'shape',
'offset', 'nbytes'}, ...], 'data_nbytes': total} and each array's raw C-order bytes start at
its `offset` (a multiple of 8) into the data section. There is no pickle: decoding never runs
code, and bytes from another version of ntkdd fail with a clear `WireError` instead of a
wrong array. Only bytes cross the RPC boundary because Courier hangs on numpy arguments.

Decoding trusts nothing it reads: a header or array that claims more bytes than the message
carries, a shape that is negative or does not match its byte count, a dtype that is not a plain
number, bool or string, more than MAX_ARRAYS arrays or MAX_DIMS dimensions, an array over
MAX_ARRAY_BYTES or a header over MAX_HEADER_BYTES is refused with a `WireError` (code
MALFORMED) before anything is allocated; arrays are views on the message's own bytes.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Protocol, Union

import numpy as np

MAGIC = b'NTKD'
VERSION = 1
_PREFIX = struct.Struct('<4sHI')    # magic, format version, header length
_ALIGN = 8                          # array data starts 8-byte aligned, so views are aligned
_FORBIDDEN_KINDS = ('O', 'V')       # object arrays need pickle; void/structured lose fields
_DECODABLE_KINDS = 'biufcSU'        # bool, integers, floats, complex, bytes and str
MAX_HEADER_BYTES = 1 << 22          # 4 MiB of JSON: headers hold names, shapes and small fields
MAX_ARRAY_BYTES = 1 << 32           # 4 GiB per array (gRPC carries at most 2 GiB anyway)
MAX_ARRAYS = 256
MAX_DIMS = 8

BytesLike = Union[bytes, bytearray, memoryview]

# The methods of a kernel worker that the coordinator calls, and those peers call on each other.
PING, SET_IMAGES, KERNEL_BLOCK, VJP_BLOCK = 'ping', 'set_images', 'kernel_block', 'vjp_block'
CACHED_IMAGES, FETCH_IMAGES = 'cached_images', 'fetch_images'
# A group's blocks in one request (workers/group_leader.py): only where workers reach each other.
GROUP_BLOCKS = 'group_blocks'
METHODS = (PING, SET_IMAGES, KERNEL_BLOCK, VJP_BLOCK)
# A group request's `method` (beside kernel_block and vjp_block) whose cotangents come as
# low-rank factors (common/cotangents.py) the leader holds as caches: its field
# `cotangent_factors` = {'g_ntk' or 'g_nngp': {'cache', 'version', 'rows'}} names, per
# cotangent, the cache of `cotangents.pack`'s array and G's rows; the leader forms each
# block's cotangent (in its dtype) for the members' plain vjp_block requests. An older
# leader refuses the method by name (bad_request), so no block runs without its cotangent.
VJP_FACTORS = 'vjp_factors'
# Caches whose array keeps the dtype it was sent in (float64 factors), where images are cast
# to the worker's dtype: what `DistributedKernels(cotangent_factors=True)` publishes per
# cotangent.
FACTOR_CACHES = {'g_ntk': 'factors_ntk', 'g_nngp': 'factors_nngp'}
# A kernel request's (and group kernel request's) optional field: the kernels to answer, a
# non-empty list of 'ntk' / 'nngp' (absent: both). An older worker answers both, and the
# coordinator reads the ones it asked for, so a mismatch costs bytes, never a wrong kernel.
KERNELS_FIELD = 'kernels'
KERNEL_NAMES = ('ntk', 'nngp')
# The fused KIP step (`DistributedKernels(fused_step=True)`, issue 18): a group request of
# method KIP_TARGETS over blocks of every support row against some target columns; its
# members get KIP_BLOCK requests (a block request plus `alpha` (n_s, C) and `target_labels`
# (block columns, C), float64, and `kernel`, 'ntk' or 'nngp'): the member computes the block's
# kernel K, the predictions P = K^T alpha, the residual r = P - y and the vjp of the block with
# the cotangent alpha r^T, and answers `grad`, `k_r` = K r (n_s, C) and `predictions`. With
# `keep_grad` = {'name', 'version'} the leader keeps its summed gradient as that cache entry
# (answering only k_r and the predictions) and SUM_CACHES, called on one worker with
# `caches` = [[peer id, name, version], ...], answers their sum in that order (`grad`): the
# partial gradients meet on the workers' links, not the coordinator's.
KIP_TARGETS, KIP_BLOCK, SUM_CACHES = 'kip_targets', 'kip_block', 'sum_caches'
# The overlapped fused step (`DistributedKernels(fused_step='overlap')`): a KIP_TARGETS
# request sent before alpha is known. In place of `alpha` it names `alpha_cache` {'name',
# 'version'}, which the coordinator sets on the leader once K_ss is solved (the leader's
# members fetch it from the leader after their blocks' forwards), and it carries `kss_blocks`
# (one list per block, in block order, of [index, r0, r1, c0, c1, pad_rows, pad_cols] blocks
# of K(support, support)) with `kss_cache` {'name', 'version'}: the member that takes a block
# first computes its K_ss blocks (kernel `kernel`) and sends each to the leader as the cache
# entry (name + str(index), version); GATHER_CACHES, called on the leader with `caches` = [[peer id,
# name, version], ...], answers those entries flattened and concatenated in that order
# (`values`), waiting for the ones announced to be on their way. The K_ss round's latency (the
# support's arrival, a round of small blocks) then hides behind the targets' forwards.
KIP_OVERLAP, GATHER_CACHES = 'kip_overlap', 'gather_caches'
# The overlapped step's early K_ss vjp: a KIP_OVERLAP request may also carry `kr_cache`
# {'name', 'version'} and `kr_blocks` (one int per block, in block order): the member that
# takes block b sends its K r (n_s, C, float64) to the leader, right after the residual and
# before the vjp, as the cache entry (name + str(kr_blocks[b]), version). The coordinator sums
# them on the leaders (SUM_CACHES, in block order: the bits of the leader's answer) while the
# round's vjps run, so beta, and K_ss's vjp, need not wait for the round's end.
KIP_EARLY_BETA, KR_CACHE = 'kip_early_beta', 'kip_kr'


def is_kss_block_list(blocks) -> bool:
  """Whether `blocks` is a list of K_ss blocks [index, r0, r1, c0, c1, pad_rows, pad_cols]
  (ints), as KIP_OVERLAP requests carry them."""
  return isinstance(blocks, list) and all(
      isinstance(b, list) and len(b) == 7 and all(isinstance(v, int) for v in b) for b in blocks)


# Caches whose array keeps the dtype it was sent in (float64) where images are cast to the
# worker's dtype: the cotangent factors, the overlapped step's alpha and its K r entries.
ALPHA_CACHE = 'kip_alpha'
FLOAT64_CACHES = tuple(FACTOR_CACHES.values()) + (ALPHA_CACHE,)
FLOAT64_PREFIXES = (KR_CACHE,)


def keeps_float64(name: str) -> bool:
  """Whether the cache entry `name` keeps float64 (see FLOAT64_CACHES) instead of the
  worker's dtype."""
  return name in FLOAT64_CACHES or name.startswith(FLOAT64_PREFIXES)


# What a worker's ping lists under `features`: the options above it serves. The coordinator
# checks it before using them, and says which workers lack one.
FEATURES = (VJP_FACTORS, KERNELS_FIELD, KIP_TARGETS, KIP_OVERLAP, KIP_EARLY_BETA)
PEER_METHODS = (CACHED_IMAGES, FETCH_IMAGES)
ARGUMENT_TYPES = (bytes, int, str)   # what a worker call carries (Courier hangs on numpy)

# The `error` field of a kernel worker's failed answer; the coordinator acts on the first two.
STALE_CACHE = 'stale_cache'          # a cache entry (name, version) the worker does not hold
MISSING_DATASET = 'missing_dataset'  # a dataset key the worker does not hold
BAD_REQUEST = 'bad_request'
EXCEPTION = 'exception'
MALFORMED = 'malformed_message'      # bytes that are not a well-formed message: refused unread


class WorkerHandle(Protocol):
  """How the coordinator holds one kernel worker, whatever launched it.

  Every handle class subclasses this explicitly (in-process `LocalWorkerHandle`, Launchpad's
  `CourierWorkerHandle`, Ray's `RayWorkerHandle`, the simulated fleet's `SimulatedHandle`).
  Each method sends bytes, ints and strs only and returns the worker's answer, a wire message
  (`decode` it); a handle raises when the worker cannot be reached, which `DistributedKernels`
  treats as the worker being down.

  Attributes:
    name: how logs and errors name the worker, e.g. 'worker 0' or 'localhost:41234'.
  """
  name: str

  def wait_ready(self, timeout_s: float) -> bytes:
    """The worker's first `ping` answer, waiting up to `timeout_s` for one still starting.

    Raises:
      TimeoutError: no answer within `timeout_s` (the message says what may be missing).
    """
    raise NotImplementedError

  def ping(self) -> bytes:
    """Who the worker is (pid, device, worker_id), its load, caches and datasets."""
    raise NotImplementedError

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    """Caches the `images` array of the message `payload` as (`name`, `version`)."""
    raise NotImplementedError

  def kernel_block(self, request: bytes) -> bytes:
    """{'ntk', 'nngp'}: the kernel block of the request's rows and columns."""
    raise NotImplementedError

  def vjp_block(self, request: bytes) -> bytes:
    """{'grad'}: the vjp of the request's block with its cotangents `g_ntk` / `g_nngp`."""
    raise NotImplementedError

  def kip_block(self, request: bytes) -> bytes:
    """Optional (the fused KIP step, see KIP_TARGETS): a block's forward, residual and vjp."""
    raise NotImplementedError

  def sum_caches(self, request: bytes) -> bytes:
    """Optional (the fused KIP step, see KIP_TARGETS): the sum of cache entries held by this
    worker's peers (or itself), fetched over their links."""
    raise NotImplementedError

  def gather_caches(self, request: bytes) -> bytes:
    """Optional (the overlapped fused step, see KIP_OVERLAP): cache entries held by this
    worker or its peers, flattened and concatenated in the order given."""
    raise NotImplementedError

  def group_blocks(self, request: bytes) -> bytes:
    """Optional (`DistributedKernels(group_size > 1)` only): this worker leads a group through
    a list of blocks and answers for all of them at once (see workers/group_leader.py). Handles
    whose workers cannot reach each other (Courier, Ray today) leave it unimplemented."""
    raise NotImplementedError


def asked_kernels(request: dict) -> tuple:
  """The kernels a (group) kernel request asks for: its KERNELS_FIELD, else both.

  Raises:
    ValueError: the field is not a non-empty list of distinct names from KERNEL_NAMES.
  """
  names = request.get(KERNELS_FIELD)
  if names is None:
    return KERNEL_NAMES
  if not (isinstance(names, list) and names and set(names) <= set(KERNEL_NAMES)
          and len(set(names)) == len(names)):
    raise ValueError(f'{KERNELS_FIELD} must be a non-empty list of distinct names from '
                     f'{KERNEL_NAMES}, got {names!r}.')
  return tuple(names)


class WireError(ValueError):
  """Bytes that are not a well-formed message of this wire format version."""
  code = MALFORMED


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
  if header_len > MAX_HEADER_BYTES:
    raise WireError(f'Header of {header_len} bytes claimed; the limit is {MAX_HEADER_BYTES}.')
  header_end = _PREFIX.size + header_len
  if len(data) < header_end:
    raise WireError(f'Truncated message: header needs {header_end} bytes, got {len(data)}.')
  try:
    header = json.loads(bytes(data[_PREFIX.size:header_end]).decode('utf-8'))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise WireError(f'Corrupt message header: {type(e).__name__}: {e}') from e
  if not (isinstance(header, dict) and isinstance(header.get('fields', {}), dict)
          and isinstance(header.get('arrays', []), list)
          and _is_count(header.get('data_nbytes', 0))):
    raise WireError('Corrupt message header: expected {"fields": {...}, "arrays": [...], '
                    '"data_nbytes": N}.')
  if len(header.get('arrays', [])) > MAX_ARRAYS:
    raise WireError(f"{len(header['arrays'])} arrays claimed; the limit is {MAX_ARRAYS}.")
  return header, header_end + _padding(header_end)


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _array_spec(spec, data_nbytes: int) -> tuple[str, np.dtype, tuple, int, int]:
  """(name, dtype, shape, offset, nbytes) of an array description, checked against the data
  section's size and the limits; WireError if anything is off. Allocates nothing."""
  if not isinstance(spec, dict):
    raise WireError(f'Corrupt array description {spec!r}: not an object.')
  name, dtype_text, shape = spec.get('name'), spec.get('dtype'), spec.get('shape')
  offset, nbytes = spec.get('offset'), spec.get('nbytes')
  if not (isinstance(name, str) and isinstance(dtype_text, str) and len(dtype_text) <= 16
          and isinstance(shape, list) and len(shape) <= MAX_DIMS
          and all(_is_count(n) for n in shape) and _is_count(offset) and _is_count(nbytes)):
    raise WireError(f'Corrupt array description {_short(spec)}: needs a name, a dtype string, '
                    f'a shape of at most {MAX_DIMS} non-negative ints, offset and nbytes.')
  try:
    dtype = np.dtype(dtype_text)
  except (TypeError, ValueError) as e:
    raise WireError(f'Array {name!r}: unknown dtype {dtype_text!r}.') from e
  if dtype.kind not in _DECODABLE_KINDS or dtype.fields is not None or dtype.shape != ():
    raise WireError(f'Array {name!r}: dtype {dtype_text!r} is not a plain number, bool or '
                    f'string type.')
  if nbytes > MAX_ARRAY_BYTES:
    raise WireError(f'Array {name!r} of {nbytes} bytes claimed; the limit is {MAX_ARRAY_BYTES}.')
  if nbytes != dtype.itemsize * math.prod(shape):   # exact: Python ints do not overflow
    raise WireError(f'Array {name!r}: shape {shape} of {dtype} is not {nbytes} bytes.')
  if offset % _ALIGN or offset + nbytes > data_nbytes:
    raise WireError(f'Array {name!r} at offset {offset} (+{nbytes} bytes) lies outside the '
                    f'{data_nbytes}-byte data section or is not {_ALIGN}-byte aligned.')
  return name, dtype, tuple(shape), offset, nbytes


def _short(value, limit: int = 200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


def decode(data: BytesLike) -> dict:
  """The message in `data`; arrays are read-only views on `data` (copy to modify).

  Raises `WireError` (code MALFORMED) for anything but a well-formed message within the limits.
  """
  try:
    view = memoryview(data).cast('B')
  except TypeError as e:
    raise WireError(f'A wire message is bytes, got {type(data).__name__}.') from e
  header, data_start = _read_header(view)
  data_nbytes = header.get('data_nbytes', 0)
  expected = data_start + data_nbytes
  if len(view) != expected:
    kind = 'Truncated' if len(view) < expected else 'Oversized'
    raise WireError(f'{kind} message: header promises {expected} bytes, got {len(view)}.')
  message = dict(header.get('fields', {}))
  for spec in header.get('arrays', []):
    name, dtype, shape, offset, nbytes = _array_spec(spec, data_nbytes)
    array = np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=data_start + offset)
    message[name] = array.view(dtype).reshape(shape)
  return message
