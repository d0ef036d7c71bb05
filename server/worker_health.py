"""Calls to a kernel worker with a deadline, and its health: down, pinged back, blocks retried."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ntkdd.server.deadline import Caller as _Caller
from ntkdd.server.kernel_tasks import WorkersUnavailable, _Task, _Worker, _WorkerFault
from ntkdd.workers import protocol


class WorkerHealth:
  """DistributedKernels' worker calls and fault handling (a mixin: it uses the backend's
  `_workers`, `_lock`, `_slot`, `_waiting`, `_closed`, `_queue` and its settings)."""


  def _call(self, worker: _Worker, method: str, *args) -> dict:
    """The decoded answer of `worker.method(*args)`; _WorkerFault if it fails or is late."""
    self._add_stats(bytes_sent=sum(len(a) for a in args if isinstance(a, bytes)))
    start = time.perf_counter()
    try:
      answer = self._call_with_deadline(getattr(worker.handle, method), args)
    finally:
      self._add_stats(seconds_waiting=time.perf_counter() - start)
    if not isinstance(answer, (bytes, bytearray, memoryview)):
      raise _WorkerFault(f'{method} answered {type(answer).__name__}, not bytes')
    start = time.perf_counter()
    try:
      response = protocol.decode(answer)
    except protocol.WireError as e:
      raise _WorkerFault(f'{method} answered unreadable bytes: {e}') from e
    finally:
      self._add_stats(bytes_received=len(answer),
                      seconds_serialising=time.perf_counter() - start)
    return response

  def _call_with_deadline(self, fn: Callable, args: tuple) -> Any:
    """fn(*args) on the slot's caller thread, abandoned (left to finish alone, the slot
    gets a new caller) past `deadline_s`."""
    caller = getattr(self._slot, 'caller', None)
    if caller is None:   # not on a slot thread (e.g. the overlapped step's exchange): a caller
      caller = _Caller('ntkdd-once-call')   # for this call only, named apart from the slots'
    box, done = caller.submit(fn, args)
    deadline = time.monotonic() + self.deadline_s
    with self._lock:
      self._waiting.add(done)      # close() sets it: no polling per call in flight
    try:
      while not done.wait(max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
          raise _WorkerFault(f'no answer within deadline_s={self.deadline_s:g}')
      if self._closed.is_set() and not box:
        raise _WorkerFault('the coordinator was closed')
    except _WorkerFault:
      caller.stop()        # it exits when the abandoned call returns, if ever
      if getattr(self._slot, 'caller', None) is caller:
        self._slot.caller = _Caller()
      raise
    finally:
      with self._lock:
        self._waiting.discard(done)
      if caller is not getattr(self._slot, 'caller', None):
        caller.stop()
    if 'error' in box:
      error = box['error']
      raise _WorkerFault(f'{type(error).__name__}: {error}')
    return box['answer']

  # -- Health. --------------------------------------------------------------------------------

  def _mark_down(self, worker: _Worker, error: str) -> None:
    now = time.monotonic()
    with self._lock:
      worker.failures += 1
      worker.last_error, worker.last_error_time = error, time.time()
      if worker.alive:
        worker.alive, worker.down_since = False, now
        worker.backoff_s = self.retry_backoff_s
      else:
        worker.backoff_s = min(2 * worker.backoff_s or self.retry_backoff_s, self.max_backoff_s)
      worker.retry_at = now + worker.backoff_s
    logging.warning('Kernel worker %d marked down (retry in %.2g s): %s', worker.index,
                    worker.backoff_s, error)

  def _probe(self, worker: _Worker) -> None:
    """Pings a worker; if it answers it is (again) used, else it stays down a while longer."""
    epoch = worker.cache_epoch
    try:
      response = self._call(worker, 'ping')
      if not response.get('ok'):
        raise _WorkerFault(f"ping answered {response.get('error')}: {response.get('message')}")
    except _WorkerFault as fault:
      self._mark_down(worker, f'ping: {fault}')
      return
    with worker.cache_lock:
      # What it holds now (a restarted worker has lost its images), unless a slot has sent
      # images since the ping, which the ping's answer may predate.
      if worker.cache_epoch == epoch:
        worker.held = dict(response.get('caches') or {})
    with self._lock:
      worker.alive, worker.down_since, worker.backoff_s = True, None, 0.0
      worker.last_seen = time.time()
      worker.info = {k: response.get(k) for k in ('pid', 'device', 'dtype', 'worker_id',
                                                  'dataset_error', 'features', 'core')}
      worker.datasets = dict(response.get('datasets') or {})
      # Workers wired to their peers (ping says how many) can fetch caches from them.
      worker.peer_id = (str(response.get('worker_id')) if response.get('peers') else None)
    logging.info('Kernel worker %d is up (pid %s, %s%s).', worker.index, response.get('pid'),
                 response.get('device'), '' if response.get('core') is None else
                 f", pinned to core {response.get('core')}")

  def _retry_elsewhere(self, task: _Task, error: str) -> None:
    task.attempts += 1
    task.errors.append(error)
    if task.attempts >= self.max_task_attempts:
      task.call.fail(WorkersUnavailable(
          f'Block rows {task.rows} x columns {task.cols} failed {task.attempts} times; '
          f'errors: {task.errors}'))
      return
    self._add_stats(blocks_requeued=1)
    self._queue.put(task)

  def _all_down_for(self) -> float:
    """Seconds since the last worker went down, if all are down; else 0."""
    with self._lock:
      if any(w.alive for w in self._workers):
        return 0.0
      return time.monotonic() - max(w.down_since for w in self._workers)

  def _last_errors(self) -> str:
    with self._lock:
      return '; '.join(f'worker {w.index}: {w.last_error}' for w in self._workers)
