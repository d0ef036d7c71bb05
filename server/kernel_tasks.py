"""The distributed kernel backend's records: its workers, published images, a call's blocks."""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable, Optional

import numpy as np

ROWS, COLS = 'rows', 'cols'      # names of the per-call image caches on the workers


class WorkersUnavailable(RuntimeError):
  """The kernel workers cannot finish a call: all down too long, or a block keeps failing."""


class _WorkerFault(Exception):
  """A worker call failed (raised, answered an error, missed the deadline, bad bytes)."""


@dataclasses.dataclass
class _Worker:
  """What the coordinator knows about one worker handle."""
  index: int
  handle: Any
  alive: bool = True
  blocks_done: int = 0
  pairs_done: int = 0
  failures: int = 0
  in_flight: int = 0
  last_seen: Optional[float] = None          # wall-clock time of the last good answer
  last_error: Optional[str] = None
  last_error_time: Optional[float] = None
  down_since: Optional[float] = None         # monotonic time it was marked down
  retry_at: float = 0.0                      # monotonic time of the next ping while down
  backoff_s: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)   # pid, device, ... from ping
  peer_id: Optional[str] = None              # its name in its peers' tables, if it has peers
  datasets: dict = dataclasses.field(default_factory=dict)   # split key -> rows, from ping
  held: dict = dataclasses.field(default_factory=dict)   # cache name -> version it holds
  cache_epoch: int = 0                       # counts set_images sent, to spot races on `held`
  cache_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  probed: threading.Event = dataclasses.field(default_factory=threading.Event)  # first ping done
  # Tail requests its first slot hands its second (requests_per_group=2): sent beside the
  # head the first slot is running, so the head's answer travels while the tail computes.
  handoff: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)


@dataclasses.dataclass
class _Published:
  """An image array published under a cache name: its version and encoded payload."""
  version: int
  images: np.ndarray     # a read-only view into `payload`
  payload: bytes


@dataclasses.dataclass
class _Part:
  """Columns [start, stop) of a call, all of one kind.

  kind: 'rows' (the row images themselves), 'dataset' (rows `indices` of the split with
  content key `key`) or 'array' (anything else).
  """
  start: int
  stop: int
  kind: str
  images: np.ndarray
  key: Optional[str] = None
  indices: Optional[np.ndarray] = None
  cache: Optional[str] = None     # the cache its columns are read from, if one


@dataclasses.dataclass
class _Task:
  """One block of a call: rows [r0, r1) against columns [c0, c1), which lie in `part`."""
  call: '_Call'
  index: int
  rows: tuple
  cols: tuple
  pairs: int
  part: Optional[_Part] = None
  blocks: Optional[list] = None     # a group request's (rows, cols, part) blocks, else None
  tail: Optional['_Task'] = None    # a head group request's tail, until handed off
  is_tail: bool = False             # a tail group request (queued behind its head's blocks)
  pair: Optional[int] = None        # the id a head and its tail share on the wire
  attempts: int = 0
  errors: list = dataclasses.field(default_factory=list)


class _Call:
  """One kernel() or vjp() call: how to build each block's request and take its answer."""

  def __init__(self, method: str, caches: dict,
               build_request: Callable[[_Task, '_Worker'], dict],
               deliver: Callable[[_Task, dict], None]):
    self.method, self.build_request, self._deliver = method, build_request, deliver
    self.caches = caches    # cache name -> version every block request of this call reads
    self.tasks: list[_Task] = []
    self._done_indices: set[int] = set()
    self._lock = threading.Lock()
    self.finished = threading.Event()
    self.error: Optional[BaseException] = None

  def deliver(self, task: _Task, response: dict) -> bool:
    """Stores a block's answer; False if the call already has it (or has failed)."""
    with self._lock:
      if self.finished.is_set() or task.index in self._done_indices:
        return False
      self._deliver(task, response)   # raises on a malformed answer, before counting it
      self._done_indices.add(task.index)
      if len(self._done_indices) == len(self.tasks):
        self.finished.set()
      return True

  def fail(self, error: BaseException) -> None:
    with self._lock:
      if not self.finished.is_set():
        self.error = error
        self.finished.set()


def _cached_fields(side: str, name: str, version: int, span: tuple) -> dict:
  return {f'{side}_cache': name, f'{side}_version': version, f'{side}_start': span[0],
          f'{side}_stop': span[1]}


def _checked(response: dict, name: str, shape: tuple) -> np.ndarray:
  array = response[name]
  if not isinstance(array, np.ndarray) or array.shape != shape:
    raise ValueError(f'{name} has shape {getattr(array, "shape", None)}, expected {shape}')
  return array
