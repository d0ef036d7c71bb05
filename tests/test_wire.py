"""Malformed wire messages: refused before anything is allocated, with an error code; a kernel
worker answers every one of them and keeps serving; the coordinator logs the code."""
import json
import logging
import struct
import tracemalloc

import numpy as np
import pytest

from ntkdd.common import architectures
from ntkdd.launch.inprocess import LocalWorkerHandle
from ntkdd.server import distributed_kernels
from ntkdd.workers import kernel_worker, protocol

FC = architectures.Architecture('fc', depth=1)
PREFIX = struct.Struct('<4sHI')


def _images(n, seed):
  return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def _message(header: dict, data: bytes = b'') -> bytes:
  """Hand-made wire bytes: any header, any data section."""
  text = json.dumps(header).encode()
  head = PREFIX.pack(protocol.MAGIC, protocol.VERSION, len(text)) + text
  return head + b'\0' * (-len(head) % 8) + data


def _spec(**kw):
  spec = {'name': 'x', 'dtype': '<f4', 'shape': [2], 'offset': 0, 'nbytes': 8}
  spec.update(kw)
  return spec


def _array_message(data_nbytes=8, data=b'\0' * 8, **kw):
  return _message({'fields': {}, 'arrays': [_spec(**kw)], 'data_nbytes': data_nbytes}, data)


# Each claims something the bytes do not hold, or something no array can be.
MALFORMED = {
    'empty': b'',
    'not a message': b'not a message at all',
    'wrong magic': b'XXXX' + b'\0' * 20,
    'other version': PREFIX.pack(protocol.MAGIC, protocol.VERSION + 1, 2) + b'{}',
    'header longer than the message': PREFIX.pack(protocol.MAGIC, protocol.VERSION, 1000) + b'{}',
    'header over the limit': PREFIX.pack(protocol.MAGIC, protocol.VERSION, 2 ** 32 - 1) + b'{}',
    'header not JSON': PREFIX.pack(protocol.MAGIC, protocol.VERSION, 4) + b'\xff\xfe{[',
    'header a list': _message([1, 2]),   # type: ignore[arg-type]
    'header nested too deep': (lambda t: PREFIX.pack(protocol.MAGIC, protocol.VERSION, len(t)) + t)(
        b'[' * 100000 + b']' * 100000),
    'fields not a dict': _message({'fields': [1], 'arrays': [], 'data_nbytes': 0}),
    'data_nbytes negative': _message({'fields': {}, 'arrays': [], 'data_nbytes': -8}),
    'data_nbytes a string': _message({'fields': {}, 'arrays': [], 'data_nbytes': '8'}),
    'data section longer than claimed': _message({'fields': {}, 'arrays': [],
                                                  'data_nbytes': 0}, b'\0' * 8),
    'data section shorter than claimed': _array_message(data_nbytes=2 ** 40),
    'array past the data section': _array_message(offset=8),
    'array negative offset': _array_message(offset=-64),
    'array unaligned offset': _array_message(data_nbytes=16, data=b'\0' * 16, offset=4),
    'array nbytes beyond the limit': _array_message(nbytes=2 ** 40, shape=[2 ** 38]),
    'shape overflowing int64': _array_message(shape=[2 ** 32, 2 ** 32, 2 ** 32], nbytes=8),
    'shape and nbytes disagree': _array_message(shape=[3]),
    'negative shape': _array_message(shape=[-2], nbytes=8),
    'shape not ints': _array_message(shape=['2']),
    'too many dimensions': _array_message(shape=[1] * 9 + [2]),
    'object dtype': _array_message(dtype='|O'),
    'void dtype': _array_message(dtype='|V8', shape=[1]),
    'subarray dtype': _array_message(dtype='(2,)<f4', shape=[1]),
    'datetime dtype': _array_message(dtype='<M8[s]', shape=[1]),
    'dtype not a string': _array_message(dtype={'names': ['a'], 'formats': ['<f8']}),
    'unknown dtype': _array_message(dtype='float1234'),
    'array description not a dict': _message({'fields': {}, 'arrays': [7], 'data_nbytes': 0}),
    'too many arrays': _message({'fields': {}, 'arrays': [_spec()] * (protocol.MAX_ARRAYS + 1),
                                 'data_nbytes': 8}, b'\0' * 8),
}


@pytest.mark.parametrize('name', sorted(MALFORMED))
def test_malformed_messages_are_refused_before_allocating(name):
  tracemalloc.start()
  try:
    with pytest.raises(protocol.WireError) as caught:
      protocol.decode(MALFORMED[name])
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert caught.value.code == protocol.MALFORMED
  # Nothing like the claimed sizes was allocated (the deep header's parse stack aside).
  assert peak < 16 * 2 ** 20, f'{name}: {peak} bytes allocated'


def test_decode_takes_only_bytes():
  with pytest.raises(protocol.WireError):
    protocol.decode(12345)
  with pytest.raises(protocol.WireError):
    protocol.decode(None)


def test_random_bytes_and_every_truncation_are_refused():
  rng = np.random.default_rng(0)
  good = protocol.encode({'rows': _images(3, 0), 'n': 3, 'name': 'abc', 'ids': np.arange(5)})
  assert protocol.decode(good)['n'] == 3
  for cut in range(len(good)):
    with pytest.raises(protocol.WireError):
      protocol.decode(good[:cut])
  with pytest.raises(protocol.WireError):
    protocol.decode(good + b'\0' * 8)
  for _ in range(300):
    blob = rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
    with pytest.raises(protocol.WireError):
      protocol.decode(blob)
    # The right prefix over random bytes: the header's own checks must catch it.
    with pytest.raises(protocol.WireError):
      protocol.decode(PREFIX.pack(protocol.MAGIC, protocol.VERSION, len(blob)) + blob)
  # Single-byte corruptions of a good message: a clean refusal or a message, never a crash.
  for _ in range(300):
    corrupt = bytearray(good)
    corrupt[int(rng.integers(0, len(good)))] = int(rng.integers(0, 256))
    try:
      protocol.decode(bytes(corrupt))
    except protocol.WireError:
      pass


def _assert_refused(answer: bytes, code: str):
  decoded = protocol.decode(answer)
  assert decoded['ok'] is False and decoded['error'] == code, decoded
  assert decoded['message']


def _serves(worker):
  x = _images(4, 1)
  answer = protocol.decode(worker.kernel_block(protocol.encode({'rows': x[:2], 'cols': x})))
  assert answer['ok'] and answer['ntk'].shape == (2, 4) and np.isfinite(answer['ntk']).all()


def test_a_worker_refuses_every_malformed_message_and_keeps_serving(caplog):
  worker = kernel_worker.KernelWorker(FC.to_dict(), worker_id=3)
  handle = LocalWorkerHandle(worker)   # Courier's rules: bytes, ints and strs only
  rng = np.random.default_rng(1)
  blobs = list(MALFORMED.values())
  blobs += [rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
            for _ in range(100)]
  good = protocol.encode({'rows': _images(2, 0), 'cols': _images(3, 0)})
  blobs += [good[:cut] for cut in range(0, len(good), 7)]
  with caplog.at_level(logging.WARNING):
    for blob in blobs:
      _assert_refused(handle.kernel_block(blob), protocol.MALFORMED)
      _assert_refused(handle.vjp_block(blob), protocol.MALFORMED)
      _assert_refused(handle.set_images('rows', 1, blob), protocol.MALFORMED)
  assert 'refused a malformed message' in caplog.text
  _serves(worker)
  assert protocol.decode(handle.ping())['ok']


def test_well_formed_requests_that_would_allocate_without_bound_are_refused():
  worker = kernel_worker.KernelWorker(FC.to_dict())
  x = _images(3, 2)
  big = kernel_worker.MAX_BLOCK_SIDE + 1
  requests = [
      {'rows': x, 'cols': x, 'pad_rows': 10 ** 12},          # would pad to 10^12 rows
      {'rows': x, 'cols': x, 'pad_cols': -1},
      {'rows': x, 'cols': x, 'pad_rows': 'many'},
      {'rows': np.zeros((big, 1), np.float32), 'cols': x[:, :1]},
      {'rows': np.array(['a', 'b']), 'cols': x},             # strings are no images
      {'rows': x, 'cols_cache': ['not', 'a', 'name'], 'cols_version': 1},
      {'rows': x, 'cols_dataset': 5, 'cols_indices': np.arange(2)},
  ]
  for request in requests:
    _assert_refused(worker.kernel_block(protocol.encode(request)), protocol.BAD_REQUEST)
  _assert_refused(worker.vjp_block(protocol.encode({'rows': x, 'cols': x, 'g_ntk': 3})),
                  protocol.BAD_REQUEST)
  _assert_refused(worker.set_images('rows', 'one', protocol.encode({'images': x})),
                  protocol.BAD_REQUEST)
  _serves(worker)


class _CorruptingHandle(LocalWorkerHandle):
  """A worker behind a link that cuts every block request short."""

  def kernel_block(self, request: bytes) -> bytes:
    return super().kernel_block(request[:len(request) // 2])


def test_the_coordinator_logs_the_error_code_and_finishes_elsewhere(caplog):
  workers = [kernel_worker.KernelWorker(FC.to_dict(), worker_id=i) for i in range(2)]
  handles = [_CorruptingHandle(workers[0]), LocalWorkerHandle(workers[1])]
  x = _images(20, 4)
  with caplog.at_level(logging.WARNING):
    backend = distributed_kernels.DistributedKernels(handles, block=8, retry_backoff_s=30)
    try:
      out = backend.kernel(x)
    finally:
      backend.close()
  reference = kernel_worker.KernelWorker(FC.to_dict())
  want = protocol.decode(reference.kernel_block(protocol.encode({'rows': x, 'cols': x})))
  np.testing.assert_allclose(out['ntk'], want['ntk'], rtol=1e-4, atol=1e-4)   # float32 tiles
  assert protocol.MALFORMED in caplog.text


# -- The worker protocol: every handle implements it explicitly. --------------------------------

def _handle_classes():
  from ntkdd.launch import launchpad_program, ray_launch   # neither imports Launchpad or Ray
  from ntkdd.workers import simulated_worker
  return [LocalWorkerHandle, simulated_worker.SimulatedHandle,
          launchpad_program.CourierWorkerHandle, ray_launch.RayWorkerHandle]


@pytest.mark.parametrize('handle_class', _handle_classes(), ids=lambda c: c.__name__)
def test_every_handle_implements_the_worker_protocol(handle_class):
  assert protocol.WorkerHandle in handle_class.__mro__
  for method in protocol.METHODS + ('wait_ready',):
    assert getattr(handle_class, method) is not getattr(protocol.WorkerHandle, method), method


def test_the_protocol_itself_implements_nothing():
  class Forgetful(protocol.WorkerHandle):
    name = 'forgetful'

  with pytest.raises(NotImplementedError):
    Forgetful().kernel_block(b'')


def test_a_local_handle_keeps_courier_rules_and_names_its_worker():
  worker = kernel_worker.KernelWorker(FC.to_dict(), worker_id=5)
  handle = LocalWorkerHandle(worker)
  assert handle.name == 'worker 5'
  assert protocol.decode(handle.wait_ready(0.0))['worker_id'] == 5
  with pytest.raises(TypeError, match='only bytes, int and str'):
    handle.set_images('rows', 1, _images(2, 0))
