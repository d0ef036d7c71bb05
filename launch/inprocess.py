"""The in-process launch type: kernel workers as objects in this process behind the coordinator.

`--launch inprocess --workers N` runs N `KernelWorker`s as plain objects in this process; the
coordinator calls each from its own threads. That is useful for testing the distributed path
without RPC, and for overlapping work (serialisation, planning and several blocks at once),
since JAX releases the GIL while a compiled computation runs. Every call still goes through
`LocalWorkerHandle`, which passes only bytes/ints/strs exactly as Courier would, so the
in-process path exercises the same wire bytes as the Launchpad one.
"""
from __future__ import annotations

from typing import Optional, Union

from ntkdd.common import architectures
from ntkdd.launch import nodes
from ntkdd.server import distributed_kernels
from ntkdd.workers import kernel_worker, protocol


class LocalWorkerHandle(protocol.WorkerHandle):
  """A `KernelWorker` called directly, with Courier's rules on argument and answer types."""

  def __init__(self, worker: kernel_worker.KernelWorker):
    self.worker = worker
    self.name = f'worker {worker.worker_id}'

  def _invoke(self, method: str, *args) -> bytes:
    for arg in args:
      if not isinstance(arg, protocol.ARGUMENT_TYPES):
        raise TypeError(f'{method} got a {type(arg).__name__} argument; worker calls take '
                        f'only bytes, int and str (Courier hangs on numpy arrays).')
    answer = getattr(self.worker, method)(*args)
    if not isinstance(answer, bytes):
      raise TypeError(f'{method} answered {type(answer).__name__}, not bytes.')
    return answer

  def wait_ready(self, timeout_s: float) -> bytes:
    """A worker in this process is up once it exists: its ping."""
    return self.ping()

  def ping(self) -> bytes:
    return self._invoke(protocol.PING)

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    return self._invoke(protocol.SET_IMAGES, name, version, payload)

  def cached_images(self, name: str, version: int) -> bytes:
    return self._invoke(protocol.CACHED_IMAGES, name, version)

  def fetch_images(self, name: str, version: int, peer: str) -> bytes:
    return self._invoke(protocol.FETCH_IMAGES, name, version, peer)

  def kernel_block(self, request: bytes) -> bytes:
    return self._invoke(protocol.KERNEL_BLOCK, request)

  def vjp_block(self, request: bytes) -> bytes:
    return self._invoke(protocol.VJP_BLOCK, request)

  def kip_block(self, request: bytes) -> bytes:
    return self._invoke(protocol.KIP_BLOCK, request)

  def sum_caches(self, request: bytes) -> bytes:
    return self._invoke(protocol.SUM_CACHES, request)

  def gather_caches(self, request: bytes) -> bytes:
    return self._invoke(protocol.GATHER_CACHES, request)

  def group_blocks(self, request: bytes) -> bytes:
    return self._invoke('group_blocks', request)


def make_inprocess_backend(arch: Union[architectures.Architecture, dict], workers: int = 1,
                           tile: Optional[int] = None, dtype: str = 'float32',
                           block: Optional[int] = 64, dataset: Optional[dict] = None,
                           **coordinator_kwargs) -> distributed_kernels.DistributedKernels:
  """A `DistributedKernels` over `workers` local `KernelWorker`s (threads in this process).

  Args:
    arch: the architecture (or its dict).
    workers: how many workers.
    tile, dtype: the workers' kernel tile and dtype.
    block: rows and columns of a kernel block (None: fitted to each call's rows).
    dataset: a `DataSpec` dict: the workers hold that data and take target rows as indices;
      in one process they share the coordinator's arrays (`common/prepared.prepare` memoises).
    **coordinator_kwargs: further `DistributedKernels` options.

  Returns:
    The backend; its `close()` (or leaving its `with` block) stops its threads.
  """
  if workers < 1:
    raise ValueError(f'--workers must be >= 1, got {workers}.')
  handles = [LocalWorkerHandle(kernel_worker.KernelWorker(nodes.arch_dict(arch), dtype, tile,
                                                          worker_id=i, dataset=dataset))
             for i in range(workers)]
  for handle in handles:    # so that broadcast='tree' can pass caches from worker to worker
    handle.worker.connect_peers(dict(enumerate(handles)))
  return distributed_kernels.DistributedKernels(handles, block=block, dtype=dtype,
                                                **coordinator_kwargs)
