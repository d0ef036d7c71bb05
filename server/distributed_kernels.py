"""The distributed kernel backend: tiles kernel and vjp calls into blocks over kernel workers.

`DistributedKernels` implements the backend protocol of `common/kip.py` (`kernel`, `vjp`) over
a list of worker handles: objects with the `KernelWorker` methods (`ping`, `set_images`,
`kernel_block`, `vjp_block`), called with bytes, ints and strs only. A handle may be a local
`KernelWorker`, a thin in-process wrapper of one, or a Courier client.

Per call, the row images are published once to each worker as the 'rows' cache, and blocks
are queued. Columns are planned per part (`common/sources`): a part equal to the rows reads the
rows cache; rows of a dataset split (`DatasetRows`, e.g. KIP's target batch or the test split)
go as indices to workers whose ping says they hold that split's content key, as pixels to the
others; other images go as the 'cols' cache when that costs fewer bytes than sending each
column block inline. Every worker runs `max_in_flight_per_worker` daemon threads pulling from one
shared queue, so fast workers take more blocks and each worker has its next block waiting.

Scale (see README, "Scaling to hundreds of workers"): `plan` chooses the blocks
(`server/block_plan`: fixed tiles, or strips sized from the worker count with a shrinking
tail), `broadcast='tree'` lets workers fetch the caches from peers that hold them (or are
receiving them) instead of the coordinator sending every copy. `group_size=g` (workers wired
to their peers) sends one `group_blocks` request per group of g workers (indices
[j g, (j + 1) g)) instead of one per block: the plan's blocks are dealt to the groups'
requests (`block_plan.group_blocks`), the worker that takes one leads it over its group's
alive members (`workers/group_leader`) and answers the kernels of all its blocks, or one
partial-gradient sum, at once; at hundreds of workers the coordinator's CPU per request is
what limits a step.

Faults: a call that raises, answers an error, or misses `deadline_s` marks its worker down
and puts the block back on the queue for the others. A down worker is pinged after a back-off
(doubling up to `max_backoff_s`) and used again when it answers. A block that fails
`max_task_attempts` times, or all workers being down for `grace_s`, raises `WorkersUnavailable`.

This module holds the control flow (planning, queueing, the slot threads); its parts live beside
it: the records (`kernel_tasks`), cache delivery and the tree broadcast (`cache_broadcast`),
group requests (`group_requests`), worker calls and health (`worker_health`), and the backend
over workers its owner started (`owned_workers`).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ntkdd.common import kernels, sources
from ntkdd.common.cotangents import LowRankCotangent
from ntkdd.server import block_plan
from ntkdd.server.cache_broadcast import CacheBroadcast
from ntkdd.server.deadline import Caller as _Caller
from ntkdd.server.fused_step import FusedKipStep
from ntkdd.server.group_requests import GroupRequests
from ntkdd.server.kernel_tasks import (  # noqa: F401 (WorkersUnavailable is public here)
    COLS, ROWS, WorkersUnavailable, _cached_fields, _Call, _checked, _Part, _Published, _Task,
    _Worker, _WorkerFault)
from ntkdd.server.owned_workers import OwnedWorkersKernels  # noqa: F401 (public here)
from ntkdd.server.progress import KernelProgress
from ntkdd.server.worker_health import WorkerHealth
from ntkdd.workers import protocol

STALE_CACHE, MISSING_DATASET = protocol.STALE_CACHE, protocol.MISSING_DATASET   # workers' error codes
BROADCASTS = ('direct', 'tree')   # how cached images reach the workers

GROUP_METHOD = protocol.GROUP_BLOCKS   # the worker method serving a group's blocks
_WAKE = object()   # put on second slots' handoff queues: look at the shared queue again
# vjp(strips=True): blocks per member in a request's strip, and columns per block at least.
STRIP_BLOCKS_PER_MEMBER, STRIP_MIN_COLS = 4, 8



class DistributedKernels(CacheBroadcast, GroupRequests, FusedKipStep, WorkerHealth):
  """The kernel backend protocol (`kernel`, `vjp`) over a pool of kernel worker handles."""

  def __init__(self, workers: Sequence, block: Optional[int] = 64, deadline_s: float = 600,
               max_in_flight_per_worker: int = 2, version_fn: Optional[Callable[[], int]] = None,
               *, dtype: str = 'float32', grace_s: float = 120.0, retry_backoff_s: float = 1.0,
               max_backoff_s: float = 30.0, max_task_attempts: int = 4, poll_s: float = 0.1,
               plan: str = 'tiles', tasks_per_worker: int = 2, tail_halvings: int = 2,
               broadcast: str = 'direct', tree_fanout: int = 8, group_size: int = 1,
               one_kernel: bool = False, cotangent_factors: bool = False,
               requests_per_group: int = 1, fused_step: Union[bool, str] = False,
               early_kss_vjp: bool = True):
    """Args beyond the protocol's:
      block: rows and columns of the square blocks a worker computes per call (plan 'tiles');
        None fits the side to each call's rows (`block_plan.tile_side`).
      deadline_s: a worker call taking longer marks the worker down (the call is abandoned).
      max_in_flight_per_worker: concurrent calls per worker, so the next block is waiting.
      version_fn: `() -> int`, a fresh cache version per new image set. The default (a
        microsecond clock at start plus a counter) never repeats across coordinator restarts,
        so a long-lived worker cannot mistake new images for old ones of the same version.
      dtype: what images are sent as and kernels returned in (the workers' dtype).
      grace_s: how long all workers may be down before a call raises WorkersUnavailable.
      retry_backoff_s, max_backoff_s: first and longest wait before pinging a down worker.
      max_task_attempts: failures of one block before its call raises WorkersUnavailable.
      poll_s: how often waiting threads check for close, deadlines and the grace period.
      plan: 'tiles' (squares of `block`) or 'balanced' (strips sized from the worker count,
        shrinking at the end of a round): see `server/block_plan`.
      tasks_per_worker, tail_halvings: the balanced plan's equal shares per worker and
        halving tail waves.
      broadcast: how the per-call image caches reach the workers: 'direct' (the coordinator
        sends every copy) or 'tree' (workers that already hold them pass them on: each
        worker whose ping reports peers fetches from a holder, at most `tree_fanout` fetches
        per holder at once; the coordinator sends one copy at a time, while no holder is free).
      group_size: workers per group request (1: a request per block). With g > 1, a call
        whose workers all have peers and whose columns all come from caches or datasets every
        worker holds goes as one request per group of g workers (see the module docstring);
        the vjp sums differ in rounding from g = 1 (partial sums per group first), but are
        as reproducible.
      one_kernel: tell KIP (`common/kip.py`) that kernel() takes `names`, so its kernel round
        asks the workers for the one kernel it reads (half the answer bytes; the same bits).
      cotangent_factors: tell KIP that vjp() takes low-rank cotangents
        (`common/cotangents.LowRankCotangent`). A group call then publishes their factors
        once as caches (broadcast like the images) and the group leaders form each block's
        cotangent: neither the (n1, n2) matrix nor its blocks pass through the coordinator.
        The cotangents equal the dense ones to float64 rounding (then cast to `dtype`), so
        the gradient agrees with the dense path to float32 rounding, not bit for bit. Block
        calls (g = 1, or workers without peers) use the factors' dense matrix.
      requests_per_group: 1, or 2: each group request is sent as a head (its first blocks,
        3/4 of its pairs) and a tail (the rest) to the same leader at once, the tail's blocks
        queued behind the head's there (`block_plan.split_request`), so the head's answer
        crosses the network while the tail computes. Needs max_in_flight_per_worker >= 2
        (the leader's second slot sends the tail). The vjp's partial sums are grouped
        differently from 1 request per group: equal to float rounding, as reproducible.
      fused_step: tell KIP that this backend has `kip_step` (server/fused_step.py): with
        group requests, each target block's forward, residual and vjp run in one member call
        (no barrier between KIP's rounds); equal to the two-round step to float32 rounding.
        Falls back to the two rounds where groups cannot serve (then or for that step).
        'overlap': the same, with K_ss computed inside the fused round and alpha sent to the
        members mid-round (server/overlap_exchange.py): one round fewer; K_ss, alpha and the
        loss keep the fused step's bits, beta (from K_ss's inverse) its float64 rounding.
      early_kss_vjp: (fused_step='overlap', workers serving protocol.KIP_EARLY_BETA) the
        members send their blocks' K r to their leaders before their vjps, so beta is known
        mid-round and K_ss's vjp is sent then, a strip of rows to each leader of the round,
        which queues it behind its fused blocks (needs max_in_flight_per_worker >= 2, else
        the requests are queued for the groups as they end): no barrier after the round. The
        same bits as False (K_ss's vjp, in the same strips, after the round).
    """
    if not workers:
      raise ValueError('DistributedKernels needs at least one worker handle.')
    if (block is not None and block < 1) or max_in_flight_per_worker < 1 or deadline_s <= 0:
      raise ValueError('Need block >= 1, max_in_flight_per_worker >= 1 and deadline_s > 0.')
    if (plan not in block_plan.PLANS or broadcast not in BROADCASTS or tree_fanout < 1
        or group_size < 1):
      raise ValueError(f'plan must be one of {block_plan.PLANS} (got {plan!r}), broadcast one '
                       f'of {BROADCASTS} (got {broadcast!r}), tree_fanout >= 1 and '
                       f'group_size >= 1 (got {group_size}).')
    self.group_size = int(group_size)
    self.one_kernel, self.cotangent_factors = bool(one_kernel), bool(cotangent_factors)
    if fused_step not in (False, True, 'overlap'):
      raise ValueError(f"fused_step must be False, True or 'overlap', got {fused_step!r}.")
    self.fused_step = bool(fused_step)
    self.fused_overlap = fused_step == 'overlap'
    self.early_kss_vjp = bool(early_kss_vjp)
    self.fused_solve_s = 0.0   # the last fused kip_step's own arithmetic (thread CPU s)
    self.overlap_cpu_s = 0.0   # ... and, overlapped, its exchange thread's (alpha, inverse)
    if requests_per_group not in (1, 2) or (requests_per_group == 2
                                            and max_in_flight_per_worker < 2):
      raise ValueError(f'requests_per_group must be 1 or 2 (2 needs max_in_flight_per_worker '
                       f'>= 2), got {requests_per_group}.')
    self.requests_per_group = int(requests_per_group)
    # Second slots wait for requests handed to them (heads' tails; the overlapped step's K_ss
    # vjp, handed to the leaders of the fused round while it runs).
    self._tails_on_second_slot = self.requests_per_group > 1 or (
        self.fused_overlap and max_in_flight_per_worker >= 2)
    self._pair_ids = itertools.count()     # a head request and its tail share one
    self._busy_groups: set[int] = set()    # groups whose worker is leading a request
    # Set while a call goes block by block: with group_size > 1 only the groups' leaders
    # wait for work otherwise (hundreds of idle threads on the queue cost the CPU we save).
    self._per_block = threading.Event()
    self._waiting: set = set()             # the done events of worker calls in flight
    self._plans: dict = {}                 # (rows, spans, symmetric) -> balanced plan
    self._deals: dict = {}                 # (groups, blocks) -> block indices per request
    self.plan, self.broadcast, self.tree_fanout = plan, broadcast, int(tree_fanout)
    self.tasks_per_worker, self.tail_halvings = int(tasks_per_worker), int(tail_halvings)
    self.block = None if block is None else int(block)
    self.deadline_s, self.dtype = float(deadline_s), np.dtype(dtype)
    self.grace_s, self.poll_s = float(grace_s), float(poll_s)
    self.retry_backoff_s, self.max_backoff_s = float(retry_backoff_s), float(max_backoff_s)
    self.max_task_attempts = int(max_task_attempts)
    # How long an idle slot thread sleeps before checking its worker (hundreds of threads
    # waking often cost the coordinator's CPU): the longest back-off between pings.
    self._idle_wait_s = max(self.poll_s, self.max_backoff_s)
    self._version_fn = version_fn or itertools.count(time.time_ns() // 1000).__next__
    self._workers = [_Worker(i, handle) for i, handle in enumerate(workers)]
    self._published: dict[str, _Published] = {}
    self._tree = threading.Condition()     # guards _holders and _root_sends (broadcast 'tree')
    # (cache, version) -> holder -> [fetches from it now, its depth in the tree]
    self._holders: dict[tuple, dict[int, list]] = {}
    self._root_sends: dict[tuple, int] = {}           # (cache, version) -> coordinator sends
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()          # worker states and counters
    self._call_lock = threading.Lock()     # one kernel()/vjp() at a time: they share caches
    self._closed = threading.Event()
    self._slot = threading.local()         # per slot thread: its `_Caller`
    self._stats = dict(calls=0, blocks_done=0, block_pairs_done=0, bytes_sent=0,
                       bytes_received=0, seconds_serialising=0.0,
                       seconds_waiting=0.0,      # summed over threads: may exceed wall time
                       blocks_requeued=0, cache_sends=0, stale_cache_resends=0,
                       index_blocks=0,           # blocks whose columns went as dataset indices
                       pixel_fallback_blocks=0,  # dataset columns sent as pixels instead
                       missing_dataset_resends=0,
                       tree_fetches=0,           # caches a worker fetched from a peer
                       tree_fetch_failures=0,    # a peer could not serve: fetched elsewhere
                       requests_done=0,          # answered block and group requests
                       members_dropped=0,        # group members a leader reported failing
                       early_kss_vjps=0,         # overlapped steps whose K_ss vjp ran mid-round
                       requests_handed=0)        # ... its requests handed to busy leaders
    self.pairs, self.seconds = 0, 0.0      # as InProcessKernels: pairs per call, call time
    self._started = time.monotonic()
    self._threads = [
        threading.Thread(target=self._serve_worker, args=(worker, slot), daemon=True,
                         name=f'ntkdd-worker{worker.index}-slot{slot}')
        for worker in self._workers for slot in range(max_in_flight_per_worker)]
    for thread in self._threads:
      thread.start()

  # -- The backend protocol. ------------------------------------------------------------------

  def kernel(self, x1: np.ndarray, x2: Optional[np.ndarray] = None,
             names: Sequence[str] = kernels.KERNELS,
             shares: Optional[tuple[int, int]] = None) -> dict:
    """{'ntk', 'nngp'}: (n1, n2) kernels; x2 None: K(x1, x1) from the upper block triangle.

    `names`: the kernels to compute and return (default both); fewer: the workers answer only
    those (protocol.KERNELS_FIELD), the same values in half the bytes.
    `shares`: (tasks_per_worker, tail_halvings) of the balanced plan for this call instead of
    the backend's (e.g. the fused KIP step's K_ss: one block per worker, see fused_step.py).
    """
    names = tuple(names)
    if not names or not set(names) <= set(kernels.KERNELS) or len(set(names)) != len(names):
      raise ValueError(f'names must be distinct kernels of {kernels.KERNELS}, got {names}.')
    # Both: the historical request, byte for byte; else the field older workers ignore.
    asked = {} if names == tuple(kernels.KERNELS) else {protocol.KERNELS_FIELD: list(names)}
    with self._call_lock:
      start = time.perf_counter()
      symmetric = x2 is None
      x1 = self._as_images(x1, 'x1')
      parts = self._column_parts(x1, x2)
      n1, n2 = len(x1), (parts[-1].stop if parts else 0)
      out = {name: np.zeros((n1, n2), self.dtype) for name in names}
      if n1 and n2:
        blocks, pads = self._plan_blocks(n1, parts, symmetric, shares)
        fields, caches, groups = self._sources(x1, parts, len({rows for rows, _, _ in blocks}))

        def place(rows: tuple, cols: tuple, name: str, block: np.ndarray) -> None:
          (r0, r1), (c0, c1) = rows, cols
          out[name][r0:r1, c0:c1] = block
          if symmetric and (r0, r1) != (c0, c1):   # off the diagonal: c0 >= r1
            out[name][c0:c1, r0:r1] = block.T

        def build_request(task: _Task, worker: _Worker) -> dict:
          return {**fields(task, worker), **pads(task), **asked}

        def deliver(task: _Task, response: dict) -> None:
          (r0, r1), (c0, c1) = task.rows, task.cols
          for name in names:
            place(task.rows, task.cols, name, _checked(response, name, (r1 - r0, c1 - c0)))
          progress.add((r1 - r0) * (c1 - c0))

        def deliver_group(task: _Task, response: dict) -> None:
          flat = {name: _checked(response, name, (task.pairs,)) for name in names}
          offset = 0
          for rows, cols, _ in task.blocks:
            shape = (rows[1] - rows[0], cols[1] - cols[0])
            for name in names:
              place(rows, cols, name, flat[name][offset:offset + shape[0] * shape[1]].reshape(
                  shape))
            offset += shape[0] * shape[1]
          progress.add(task.pairs)

        if groups:
          group_fields = self._group_fields(x1, parts, caches, pads, 'kernel_block')
          call = _Call(GROUP_METHOD, caches,
                       lambda task, worker: {**group_fields(task, worker), **asked},
                       deliver_group)
        else:
          call = _Call('kernel_block', caches, build_request, deliver)
        progress = KernelProgress('kernel', sum((r1 - r0) * (c1 - c0)
                                                for (r0, r1), (c0, c1), _ in blocks))
        self._run(call, blocks, groups)
        progress.close()
      self._count(n1 * n2, start)
      return out

  def vjp(self, x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray] = None,
          g_nngp: Optional[np.ndarray] = None) -> np.ndarray:
    """d/dx1 of <g_ntk, NTK(x1, x2)> + <g_nngp, NNGP(x1, x2)> (x2 held fixed)."""
    with self._call_lock:
      return self._vjp(x1, x2, g_ntk, g_nngp)

  def _vjp(self, x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray] = None,
           g_nngp: Optional[np.ndarray] = None, strips: bool = False,
           leaders: Optional[dict] = None) -> np.ndarray:
    """vjp() without its lock: for a call made by the holder of the lock (the overlapped
    step's exchange, queueing K_ss's vjp while the fused round runs). `strips`: with group
    requests, each takes a strip of rows (`block_plan.strip_requests`), so each gradient row
    crosses the coordinator's link once; the sums' grouping, so their rounding, follows.
    `leaders` {request index: worker}: those requests go to that worker's second slot (its
    leader queues their blocks behind the request it leads now; `_run`)."""
    start = time.perf_counter()
    x1 = self._as_images(x1, 'x1')
    parts = self._column_parts(x1, x2)
    n1, n2 = len(x1), (parts[-1].stop if parts else 0)
    given = {name: g for name, g in (('g_ntk', g_ntk), ('g_nngp', g_nngp)) if g is not None}
    factored = {name: _as_factors(g, name, (n1, n2)) for name, g in given.items()
                if isinstance(g, LowRankCotangent)}
    cotangents = {name: self._as_cotangent(g, name, (n1, n2))
                  for name, g in given.items() if name not in factored}
    grad = np.zeros(x1.shape, self.dtype)
    if n1 and n2 and given:
      blocks, pads = self._plan_blocks(n1, parts, False)
      fields, caches, groups = self._sources(x1, parts, len({rows for rows, _, _ in blocks}))
      deal = None
      if strips and groups and len(parts) == 1:
        # Several blocks per member: one whose previous block ends early takes more.
        pieces = max(1, min(STRIP_BLOCKS_PER_MEMBER * self.group_size, n2 // STRIP_MIN_COLS))
        planned, deal = block_plan.strip_requests(n1, n2, groups, pieces)
        blocks = [(rows, cols, parts[0]) for rows, cols, _ in planned]
        groups, pads = len(deal), _own_shape_pads
      if not groups:   # block requests carry their cotangent blocks: form the matrix here
        cotangents.update({name: self._as_cotangent(g.dense(), name, (n1, n2))
                           for name, g in factored.items()})
        factored = {}
      partials: dict[int, tuple] = {}

      def build_request(task: _Task, worker: _Worker) -> dict:
        (r0, r1), (c0, c1) = task.rows, task.cols
        g_blocks = {name: np.ascontiguousarray(g[r0:r1, c0:c1])
                    for name, g in cotangents.items()}
        return {**fields(task, worker), **pads(task), **g_blocks}

      def deliver(task: _Task, response: dict) -> None:
        (r0, r1) = task.rows
        partials[task.index] = (slice(r0, r1), _checked(response, 'grad',
                                                         (r1 - r0,) + x1.shape[1:]))

      def deliver_group(task: _Task, response: dict) -> None:
        rows = response['grad_rows']
        if not (isinstance(rows, np.ndarray) and rows.ndim == 1 and rows.dtype.kind in 'iu'
                and len(rows) and rows.min() >= 0 and rows.max() < n1
                and np.all(np.diff(rows) > 0)):
          raise ValueError('grad_rows must be increasing row indices of x1')
        partials[task.index] = (rows, _checked(response, 'grad', (len(rows),) + x1.shape[1:]))

      if groups:
        group_fields = self._group_fields(x1, parts, caches, pads,
                                          protocol.VJP_FACTORS if factored else 'vjp_block')
        # After the group fields: the members need not fetch the factors, only leaders.
        factor_fields = self._publish_factors(factored, caches)

        def build_group(task: _Task, worker: _Worker) -> dict:
          flat = {name: np.concatenate([g[r0:r1, c0:c1].ravel()
                                        for (r0, r1), (c0, c1), _ in task.blocks])
                  for name, g in cotangents.items()}
          return {**group_fields(task, worker), **flat, **factor_fields}

        call = _Call(GROUP_METHOD, caches, build_group, deliver_group)
      else:
        call = _Call('vjp_block', caches, build_request, deliver)
      self._run(call, blocks, groups, deal, leaders)
      # Sum the partial gradients in plan order (a function of the shapes and the worker
      # count only), so the result is the same whichever worker finished first.
      for task in call.tasks:
        rows, partial = partials[task.index]
        grad[rows] += partial
    self._count(n1 * n2, start)
    return grad

  def pairs_per_second(self) -> float:
    return self.pairs / self.seconds if self.seconds else 0.0

  def status(self) -> dict:
    """Per-worker health and load, totals, throughput and where the coordinator's time went."""
    now, wall = time.monotonic(), time.time()
    with self._lock:
      workers = [{
          'worker': w.index, 'alive': w.alive, 'blocks_done': w.blocks_done,
          'pairs_done': w.pairs_done, 'in_flight': w.in_flight, 'failures': w.failures,
          'last_seen': w.last_seen,
          'seconds_since_seen': None if w.last_seen is None else wall - w.last_seen,
          'last_error': w.last_error, 'last_error_time': w.last_error_time,
          'down_for_s': None if w.down_since is None else now - w.down_since,
          'pid': w.info.get('pid'), 'device': w.info.get('device'), 'core': w.info.get('core'),
          'datasets': sorted(w.datasets), 'dataset_error': w.info.get('dataset_error')}
          for w in self._workers]
      stats = dict(self._stats)
    stats.update(workers=workers, alive_workers=sum(w['alive'] for w in workers),
                 pairs_done=self.pairs, pairs_per_second=self.pairs_per_second(),
                 seconds_in_calls=self.seconds, uptime_s=now - self._started,
                 closed=self._closed.is_set())
    return stats

  def close(self) -> None:
    """Stops the worker threads (abandoning any hung call); the backend is unusable after."""
    if self._closed.is_set():
      return
    self._closed.set()
    self._per_block.set()       # wakes slot threads parked while groups lead
    with self._lock:
      for done in self._waiting:   # and those waiting for an answer
        done.set()
    for _ in self._threads:
      self._queue.put(None)     # wakes threads blocked on the queue
    for worker in self._workers:
      worker.handoff.put(None)  # and second slots waiting for tails
    for thread in self._threads:
      thread.join(timeout=max(1.0, 5 * self.poll_s))
    alive = [t.name for t in self._threads if t.is_alive()]
    if alive:
      logging.warning('Coordinator threads still running after close: %s.', alive)

  def __enter__(self) -> 'DistributedKernels':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- Planning. ------------------------------------------------------------------------------

  def _as_images(self, x: Any, name: str, like: Optional[np.ndarray] = None,
                 check_finite: bool = True) -> np.ndarray:
    x = np.asarray(x, self.dtype)
    if x.ndim not in (2, 4):
      raise ValueError(f'{name} must be NHWC images or (N, D) vectors, got shape {x.shape}.')
    if like is not None and x.shape[1:] != like.shape[1:]:
      raise ValueError(f'x1 and x2 must have the same image shape, got {like.shape[1:]} and '
                       f'{x.shape[1:]}.')
    if check_finite and not np.all(np.isfinite(x)):
      raise ValueError(f'{name} contains NaN or inf; check the data or the preprocessing.')
    return x

  def _as_cotangent(self, g: Any, name: str, shape: tuple) -> np.ndarray:
    g = np.asarray(g, self.dtype)
    if g.shape != shape:
      raise ValueError(f'{name} has shape {g.shape}, expected {shape} (rows x1, columns x2).')
    return g

  def _column_parts(self, x1: np.ndarray, x2: Any) -> list[_Part]:
    """The columns of a call as parts (x2 None: the rows themselves)."""
    if x2 is None:
      return [_Part(0, len(x1), 'rows', x1)] if len(x1) else []
    parts = []
    for start, piece in sources.parts_of(x2):
      # Dataset rows are the prepared split the workers hold: no finiteness scan (15 M
      # values for a 5000-image CIFAR batch, twice a step) on the coordinator's CPU.
      images = self._as_images(piece, 'x2', like=x1,
                               check_finite=not isinstance(piece, sources.DatasetRows))
      stop = start + len(images)
      if isinstance(piece, sources.DatasetRows):
        parts.append(_Part(start, stop, 'dataset', images, piece.key, piece.indices))
      elif images.shape == x1.shape and np.array_equal(images, x1):
        parts.append(_Part(start, stop, 'rows', x1))
      else:
        parts.append(_Part(start, stop, 'array', images))
    return parts

  def _plan_blocks(self, n1: int, parts: list[_Part], symmetric: bool,
                   shares: Optional[tuple[int, int]] = None
                   ) -> tuple[list, Callable[[_Task], dict]]:
    """((rows, cols, part) blocks in queue order, task -> its pad fields); see block_plan.
    `shares`: the balanced plan's (tasks_per_worker, tail_halvings), default the backend's."""
    spans = [(part.start, part.stop) for part in parts]
    if self.plan == 'tiles':
      side = block_plan.tile_side(n1, self.block)
      planned = block_plan.tile_blocks(n1, spans, side, symmetric)
      fixed = {'pad_rows': min(side, n1), 'pad_cols': min(side, spans[-1][1])}
      return [(r, c, parts[i]) for r, c, i in planned], lambda task: fixed
    shares = shares or (self.tasks_per_worker, self.tail_halvings)
    key = (n1, tuple(spans), symmetric, shares)
    planned = self._plans.get(key)
    if planned is None:   # the same shapes every step: plan once (ms of Python at 256 workers)
      planned = block_plan.balanced_blocks(n1, spans, len(self._workers), symmetric, *shares)
      self._plans = {**(self._plans if len(self._plans) < 16 else {}), key: planned}

    return [(r, c, parts[i]) for r, c, i in planned], _own_shape_pads

  def _sources(self, x1: np.ndarray, parts: list[_Part],
               row_blocks: int) -> tuple[Callable[[_Task, _Worker], dict], dict, int]:
    """(request fields of a block's rows and columns for a worker, cache name -> version read,
    the number of group requests per call or 0: a request per block).

    Rows come from the rows cache. Columns: see the module docstring.
    """
    caches = {ROWS: self._publish(ROWS, x1).version}
    arrays = [p for p in parts if p.kind == 'array']
    groups = self._groups(parts) if len(arrays) <= 1 else 0
    cols_part = None
    if len(arrays) == 1:
      current = self._published.get(COLS)
      images = arrays[0].images
      unchanged = current is not None and current.images.shape == images.shape and (
          np.array_equal(current.images, images))
      # Cached columns cost one copy per worker; inline ones one copy per row block (and
      # group requests carry no images).
      if unchanged or row_blocks > len(self._workers) or groups:
        cols_part = arrays[0]
        caches[COLS] = self._publish(COLS, images).version
    for part in parts:
      part.cache = ROWS if part.kind == 'rows' else COLS if part is cols_part else None

    def fields(task: _Task, worker: _Worker) -> dict:
      part = task.part
      out = _cached_fields('rows', ROWS, caches[ROWS], task.rows)
      span = (task.cols[0] - part.start, task.cols[1] - part.start)
      if part.kind == 'rows':
        out.update(_cached_fields('cols', ROWS, caches[ROWS], span))
      elif part is cols_part:
        out.update(_cached_fields('cols', COLS, caches[COLS], span))
      elif part.kind == 'dataset' and self._holds(worker, part.key):
        out.update(cols_dataset=part.key, cols_indices=part.indices[span[0]:span[1]])
        self._add_stats(index_blocks=1)
      else:
        out['cols'] = part.images[span[0]:span[1]]
        if part.kind == 'dataset':
          self._add_stats(pixel_fallback_blocks=1)
      return out

    return fields, caches, groups

  def _holds(self, worker: _Worker, key: str) -> bool:
    with self._lock:
      return key in worker.datasets

  def _run(self, call: _Call, blocks: list, groups: int = 0, deal: Optional[list] = None,
           leaders: Optional[dict] = None) -> None:
    """Queues the blocks of `call` (or, `groups` > 0, that many group requests of them, dealt
    by `group_blocks` unless `deal` gives each request's block indices) and waits until all
    are answered or the call fails. `leaders` {request index: worker} (one request per group,
    second slots taking handed requests): those requests are handed to that worker's second
    slot as tails (its leader queues their blocks behind the request it leads now: a member
    takes one as its current block ends), the others queued."""
    if self._closed.is_set():
      raise WorkersUnavailable('The coordinator is closed.')
    if groups:
      key = (groups, tuple((rows, cols) for rows, cols, _ in blocks))
      deal = deal or self._deals.get(key)
      if deal is None:
        deal = block_plan.group_blocks([(rows, cols, 0) for rows, cols, _ in blocks], groups)
        self._deals = {**(self._deals if len(self._deals) < 16 else {}), key: deal}
      heads, tails = [], []
      for dealt in deal:
        if self.requests_per_group == 2:
          head, tail = block_plan.split_request([(r, c, 0) for r, c, _ in blocks], dealt)
        else:
          head, tail = dealt, []
        heads.append(_group_task(call, len(heads), [blocks[i] for i in head]))
        if tail:   # indices after the heads: the vjp sums in a fixed order
          tails.append(_group_task(call, len(deal) + len(tails), [blocks[i] for i in tail]))
          tails[-1].is_tail, heads[-1].tail = True, tails[-1]
          heads[-1].pair = tails[-1].pair = next(self._pair_ids)
      call.tasks.extend(heads + tails)
      if leaders and not tails and self._tails_on_second_slot:
        for head in heads:
          leader = leaders.get(head.index)
          if leader is not None and leader.alive:
            head.is_tail = True   # not queued; its request says 'tail' (behind the heads)
            leader.handoff.put(head)
            self._add_stats(requests_handed=1)
    for index, (rows, cols, part) in enumerate([] if groups else blocks):
      pairs = (rows[1] - rows[0]) * (cols[1] - cols[0])
      call.tasks.append(_Task(call, index, rows, cols, pairs, part))
    self._add_stats(calls=1)
    if not groups:
      self._per_block.set()
      if self._tails_on_second_slot:   # second slots wait for tails: block requests now
        for worker in self._workers:
          worker.handoff.put(_WAKE)
    try:
      self._queue_and_wait(call)
    finally:
      self._per_block.clear()

  def _queue_and_wait(self, call: _Call) -> None:
    for task in call.tasks:
      if not task.is_tail:   # a tail goes with its head
        self._queue.put(task)
    while not call.finished.wait(self.poll_s):
      if self._closed.is_set():
        call.fail(WorkersUnavailable('The coordinator was closed during a call.'))
      down_for = self._all_down_for()
      if down_for > self.grace_s:
        call.fail(WorkersUnavailable(
            f'All {len(self._workers)} kernel workers have been down for {down_for:.1f} s '
            f'(grace_s={self.grace_s:g}); last errors: {self._last_errors()}'))
    if call.error is not None:
      raise call.error

  # -- Worker threads. ------------------------------------------------------------------------

  def _serve_worker(self, worker: _Worker, slot: int) -> None:
    """One in-flight slot of a worker: pulls blocks while it is up; slot 0 pings it when down."""
    self._slot.caller = _Caller()
    try:
      self._serve_slot(worker, slot)
    finally:
      self._slot.caller.stop()

  def _serve_slot(self, worker: _Worker, slot: int) -> None:
    if slot == 0:
      try:
        self._probe(worker)   # learn its pid, device, caches, datasets; down if it is not up
      finally:
        worker.probed.set()
    else:   # the other slots wait for that, so no block goes out before we know the worker
      while not worker.probed.wait(self.poll_s) and not self._closed.is_set():
        pass
    while not self._closed.is_set():
      if slot == 1 and self._tails_on_second_slot and self._serve_tail(worker):
        continue
      if not worker.alive:
        if slot == 0 and time.monotonic() >= worker.retry_at:
          self._probe(worker)
        else:
          self._closed.wait(self.poll_s)
        continue
      if (self.group_size > 1 and not self._per_block.is_set()
          and not self._leads_group(worker, slot)):
        if slot == 1 and self._tails_on_second_slot:
          self._serve_tail(worker, wait_s=self._idle_wait_s)   # its tails, while it leads
        else:
          self._per_block.wait(self._idle_wait_s)   # group leaders take the requests now
        continue
      if slot and worker.in_flight and self._queue.qsize() <= len(self._workers):
        # The end of a round: a block queued behind this worker's running one would wait
        # while other workers sit idle, so the last blocks go to workers with nothing to do.
        self._closed.wait(self.poll_s / 4)
        continue
      try:
        # Idle slots block here (close() wakes them); they wake now and then only to ping
        # their worker if another thread marked it down meanwhile.
        task = self._queue.get(timeout=self._idle_wait_s)
      except queue.Empty:
        continue
      if task is None:
        break
      if task.call.finished.is_set():
        continue              # left over from a call that failed or already has this block
      if not worker.alive:    # went down while this slot waited on the queue
        self._queue.put(task)
        continue
      if task.blocks is not None and not self._claim_group(worker):
        # Its group leads another request: a worker of a free group takes this one.
        self._queue.put(task)
        task.call.finished.wait(self.poll_s)
        continue
      try:
        self._run_task(worker, task)
      except Exception as e:  # A coordinator bug: fail the call loudly rather than hang it.
        logging.exception('Coordinator thread of worker %d failed.', worker.index)
        task.call.fail(e)
      finally:
        if task.blocks is not None:
          self._release_group(worker)

  def _run_task(self, worker: _Worker, task: _Task) -> None:
    with self._lock:
      worker.in_flight += 1
    try:
      request, retried = None, set()
      for _ in range(3):   # at most one re-send per kind of recoverable error
        if request is None:
          start = time.perf_counter()
          request = protocol.encode(task.call.build_request(task, worker))
          self._add_stats(seconds_serialising=time.perf_counter() - start)
        self._ensure_caches(worker, task)
        epoch = worker.cache_epoch
        if task.tail is not None:   # sent beside the head: see requests_per_group
          tail, task.tail = task.tail, None
          worker.handoff.put(tail)
        response = self._call(worker, task.call.method, request)
        if response.get('ok'):
          self._deliver(worker, task, response)
          return
        error = response.get('error')
        if error == MISSING_DATASET and error not in retried:
          # It no longer holds the data (restarted without it): send it pixels from now on.
          logging.info('Worker %d: %s Sending pixels.', worker.index, response.get('message'))
          retried.add(error)
          self._add_stats(missing_dataset_resends=1)
          with self._lock:
            worker.datasets.pop(task.part.key, None)
          request = None
          continue
        if error == STALE_CACHE and error not in retried:
          retried.add(error)
          # The worker lost or replaced our images (restart, another coordinator): re-send.
          logging.info('Worker %d: %s Re-sending.', worker.index, response.get('message'))
          self._add_stats(stale_cache_resends=1)
          with worker.cache_lock:
            if worker.cache_epoch == epoch:   # else another slot has re-sent them already
              for name in task.call.caches:
                worker.held.pop(name, None)
          continue
        raise _WorkerFault(f"{response.get('error')}: {response.get('message')}")
      raise _WorkerFault(f'gave up after re-sending for {sorted(retried)}')
    except _WorkerFault as fault:
      self._mark_down(worker, str(fault))
      self._retry_elsewhere(task, f'worker {worker.index}: {fault}')
    finally:
      with self._lock:
        worker.in_flight -= 1

  def _deliver(self, worker: _Worker, task: _Task, response: dict) -> None:
    try:
      delivered = task.call.deliver(task, response)
    except (KeyError, ValueError, TypeError) as e:
      raise _WorkerFault(f'malformed {task.call.method} answer: {e}') from e
    with self._lock:
      worker.last_seen = time.time()
      if delivered:
        blocks = 1 if task.blocks is None else len(task.blocks)
        worker.blocks_done += blocks
        worker.pairs_done += task.pairs
        self._stats['blocks_done'] += blocks
        self._stats['requests_done'] += 1
        self._stats['block_pairs_done'] += task.pairs
    dropped = response.get('dropped') or {}
    if dropped:
      with self._lock:
        peers = {w.peer_id: w for w in self._workers if w.peer_id is not None}
      for peer, message in dropped.items():
        if peer in peers:   # a member its leader could not use: down until a ping answers
          self._add_stats(members_dropped=1)
          self._mark_down(peers[peer], f'dropped by group leader {worker.index}: {message}')

  def _serve_tail(self, worker: _Worker, wait_s: float = 0.0) -> bool:
    """Runs a tail request handed to this worker's second slot (waiting up to `wait_s` for
    one); one whose worker went down goes back on the queue for another group. Whether there
    was one."""
    try:
      task = worker.handoff.get(timeout=wait_s) if wait_s else worker.handoff.get_nowait()
    except queue.Empty:
      return False
    if task is None or task is _WAKE or task.call.finished.is_set():
      return task is not None
    if not worker.alive:
      self._queue.put(task)
      return True
    try:
      self._run_task(worker, task)
    except Exception as e:  # A coordinator bug: fail the call loudly rather than hang it.
      logging.exception('Coordinator thread of worker %d failed.', worker.index)
      task.call.fail(e)
    return True

  # -- Counters. ------------------------------------------------------------------------------

  def _add_stats(self, **increments) -> None:
    with self._lock:
      for key, value in increments.items():
        self._stats[key] += value

  def _count(self, pairs: int, start: float) -> None:
    self.pairs += pairs
    self.seconds += time.perf_counter() - start


def _as_factors(g: LowRankCotangent, name: str, shape: tuple) -> LowRankCotangent:
  """`g` with float64 factors, checked to be a cotangent of `shape`."""
  left, right = np.asarray(g.left, np.float64), np.asarray(g.right, np.float64)
  if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1] or (
      (len(left), len(right)) != shape):
    raise ValueError(f'{name}: low-rank factors {left.shape} and {right.shape} do not make a '
                     f'{shape} cotangent (rows x1, columns x2).')
  return LowRankCotangent(left, right, float(g.diagonal))


def _own_shape_pads(task: Optional[_Task]) -> dict:
  """A block's pad fields when each block is computed at its own shape (the balanced plan and
  vjp strips repeat per step, so each shape compiles once); none for a whole call (None)."""
  if task is None:
    return {}
  (r0, r1), (c0, c1) = task.rows, task.cols
  return {'pad_rows': r1 - r0, 'pad_cols': c1 - c0}


def _group_task(call: _Call, index: int, blocks: list) -> _Task:
  """A group request of `blocks` ((rows, cols, part) each), spanning their rows and columns."""
  rows = (min(b[0][0] for b in blocks), max(b[0][1] for b in blocks))
  cols = (min(b[1][0] for b in blocks), max(b[1][1] for b in blocks))
  pairs = sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1), _ in blocks)
  return _Task(call, index, rows, cols, pairs, blocks=blocks)
