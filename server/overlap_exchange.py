"""The overlapped fused KIP step's exchange: K_ss gathered from the group leaders during the
fused round, alpha solved and sent back to them (protocol.KIP_OVERLAP, issue 18).

The fused step (server/fused_step.py) first computes K_ss in a round of its own, solves alpha,
then sends the target blocks; that K_ss round is latency (the support's arrival, ~10^4-10^5
pairs over hundreds of workers). Here the fused round's group requests go out at once, before
alpha is known, each member computing its share of K_ss's blocks first, then its target
block's forward (no alpha needed), then fetching alpha from its leader for the residual and the
vjp. Meanwhile this exchange gathers K_ss from the leaders (one `gather_caches` per group, which
waits for the members' blocks), solves alpha, and sets it on each leader: the K_ss round's
latency hides behind the targets' forwards.

K_ss's blocks are the ones `DistributedKernels.kernel` plans for the same call (K_SS_SHARES),
computed by the same worker code with the same padding, so K_ss, alpha, the loss and the
predictions equal the fused step's bit for bit (beta, from the inverse computed here after
alpha is sent, to float64 rounding). Faults: a member that fails before sending its blocks has its target
block redone by another member, which sends them again; a leader that fails has its group
request sent to another worker, and the gather follows it; a request built once alpha is known
carries alpha itself.

Early K_ss vjp (protocol.KIP_EARLY_BETA): K_ss's vjp needs beta = A^-1 sum(K_st r), which the
two-round and fused steps learn from the round's answers, so its round starts after the last
group's. Here each member also sends its block's K r to its leader right after the residual,
before its vjp; this thread sums them on the leaders (SUM_CACHES, in block order, then over the
groups in plan order: the additions and order of the answers' K r, so the same bits) while the
vjps run, computes beta and K_ss's cotangent, and sends K_ss's vjp then, one request (a strip
of rows) to each leader of the round, which queues its blocks behind the fused ones: each member
takes one as its fused block ends, and each group's answer crosses the coordinator's link as
the group ends. Best effort: if the sums cannot be had (a leader lost, a
request re-sent with alpha), the step runs K_ss's vjp after the round as before.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from ntkdd.server.kernel_tasks import _Call, _Task, _Worker, _WorkerFault
from ntkdd.workers import protocol

KSS_CACHE = 'kip_kss'   # K_ss block j is held by its group's leader as KSS_CACHE + str(j)
GATHER_ATTEMPTS = 3     # gather_caches calls to one leader (each waits PEER_WAIT_S at most)


def summed_in_order(parts: list) -> np.ndarray:
  """parts[0] + parts[1] + ..., added left to right into a copy of the first: the fused step
  sums its groups' K r this way, from the answers or (early) from the leaders' sums, and beta
  must come out with the same bits from either."""
  total = parts[0].copy()
  for part in parts[1:]:
    total += part
  return total


class OverlapExchange:
  """One overlapped step's shared state: the fused round's request builder asks it for each
  group request's alpha fields (`fields`); `start` runs the gather-solve-send thread."""

  def __init__(self, backend, kss_blocks: list, kss_pads: Callable[[_Task], dict],
               fused_blocks: list, version: int, solve: Callable[[np.ndarray], np.ndarray],
               invert: Callable[[np.ndarray], np.ndarray],
               on_alpha_sent: Optional[Callable[[dict], None]] = None,
               early: Optional[tuple[Callable, Callable]] = None):
    """Args:
      backend: the DistributedKernels (its `_call`, `dtype`, `poll_s`).
      kss_blocks: K(support, support)'s blocks ((r0, r1), (c0, c1), part), as kernel() plans.
      kss_pads: task -> its pad fields, as kernel() sends them.
      fused_blocks: the fused round's blocks, in plan order.
      version: the cache version of this step's alpha and K_ss blocks.
      solve: K_ss (float64; it may symmetrise it in place) -> alpha.
      invert: K_ss -> the regularised K_ss's inverse, computed once alpha is sent (the
        round's remaining compute hides it), for beta after the round.
      on_alpha_sent: called with ({group request index: its leader}, version) once alpha is
        on its way (the fused step starts the sum of the leaders' kept gradients then).
      early: the early K_ss vjp's two steps, or None (K_ss's vjp after the round):
        (K r summed, alpha, the inverse) -> (beta, K_ss's dense cotangent), and (that
        cotangent, {group request index: its leader now}) -> K_ss's vjp (the backend's vjp
        without its lock, the round holding it; request g handed to group g's leader).
    """
    self.backend, self.version = backend, int(version)
    self.solve, self.invert, self.on_alpha_sent = solve, invert, on_alpha_sent
    self.early = early
    self.early_result: Optional[tuple[np.ndarray, np.ndarray]] = None   # (beta, K_ss's grad)
    n_fused = len(fused_blocks)
    # K_ss block j rides with fused block j mod n (one per member while there are as many).
    self._block_index = {(rows, cols): i for i, (rows, cols, _) in enumerate(fused_blocks)}
    self._kss_of = [[] for _ in range(n_fused)]
    for j, ((r0, r1), (c0, c1), _) in enumerate(kss_blocks):
      pads = kss_pads(_Task(None, j, (r0, r1), (c0, c1), 0))
      self._kss_of[j % n_fused].append([j, r0, r1, c0, c1, pads.get('pad_rows', r1 - r0),
                                        pads.get('pad_cols', c1 - c0)])
    self.n_support = max((c1 for _, (_, c1), _ in kss_blocks), default=0)
    self.alpha: Optional[np.ndarray] = None
    self.k_ss: Optional[np.ndarray] = None
    self.inverse: Optional[np.ndarray] = None
    self.solve_s = 0.0               # this thread's CPU seconds: alpha and the inverse
    self._leaders: dict[int, tuple[_Worker, _Task]] = {}   # group task index -> its leader now
    self._with_alpha: set[int] = set()   # group requests (re-)sent with alpha: no K r pushes
    self._changed = threading.Condition()
    self._thread: Optional[threading.Thread] = None
    self._error: Optional[BaseException] = None

  def fields(self, task: _Task, worker: _Worker) -> dict:
    """A group request's alpha fields: alpha itself once known, else the overlapped fields
    (this worker noted as the group's leader, whose K_ss blocks are gathered from it)."""
    with self._changed:
      if self.alpha is not None:
        self._with_alpha.add(task.index)
        self._changed.notify_all()
        return {'alpha': self.alpha}
      self._leaders[task.index] = (worker, task)
      self._changed.notify_all()
    out = {'alpha_cache': {'version': self.version},
           'kss_cache': {'name': KSS_CACHE, 'version': self.version},
           'kss_blocks': [self._kss_of[self._block_index[(rows, cols)]]
                          for rows, cols, _ in task.blocks]}
    if self.early is not None:
      out.update(kr_cache={'name': protocol.KR_CACHE, 'version': self.version},
                 kr_blocks=self._kr_blocks(task))
    return out

  def _kr_blocks(self, task: _Task) -> list[int]:
    """The fused round's plan indices of a group request's blocks (its K r entries' names)."""
    return [self._block_index[(rows, cols)] for rows, cols, _ in task.blocks]

  def start(self, call: _Call, groups: int) -> None:
    """Gathers K_ss from the `groups` group requests' leaders, solves alpha and sends it, on a
    thread of its own (`result` waits for it)."""
    self._thread = threading.Thread(target=self._run, args=(call, groups), daemon=True,
                                    name='ntkdd-overlap')
    self._thread.start()

  def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[tuple]]:
    """(K_ss float64, alpha, the regularised K_ss's inverse, (beta, K_ss's vjp) or None)
    once the thread is done; its error re-raised."""
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self.k_ss, self.alpha, self.inverse, self.early_result

  def _run(self, call: _Call, groups: int) -> None:
    try:
      k_ss = np.zeros((self.n_support, self.n_support), self.backend.dtype)
      with concurrent.futures.ThreadPoolExecutor(groups, thread_name_prefix='ntkdd-gather') \
          as pool:
        for blocks, values in pool.map(lambda g: self._gather(call, g), range(groups)):
          self._place(k_ss, blocks, values)
      k_ss = k_ss.astype(np.float64)
      solving = time.thread_time()
      alpha = self.solve(k_ss)
      self.solve_s = time.thread_time() - solving
      with self._changed:   # from now on, requests carry alpha itself
        self.k_ss, self.alpha = k_ss, alpha
        leaders = {worker.index: worker for worker, _ in self._leaders.values()}
      payload = protocol.encode({'images': alpha})
      with concurrent.futures.ThreadPoolExecutor(len(leaders) or 1,
                                                 thread_name_prefix='ntkdd-alpha') as pool:
        list(pool.map(lambda worker: self._send_alpha(worker, payload), leaders.values()))
      if self.on_alpha_sent is not None:
        with self._changed:
          self.on_alpha_sent({g: worker for g, (worker, _) in self._leaders.items()},
                             self.version)
      solving = time.thread_time()
      self.inverse = self.invert(k_ss)
      self.solve_s += time.thread_time() - solving
    except BaseException as e:  # the fused round then fails or times out: say why
      self._error = e
      call.fail(e if isinstance(e, Exception) else RuntimeError(str(e)))
      return
    if self.early is not None and not any(task.is_tail for task in call.tasks):
      try:
        self.early_result = self._early_kss_vjp(call, groups)
      except Exception as e:  # K_ss's vjp then runs after the round, as without `early`
        logging.info('Early K_ss vjp abandoned (%s: %s); it runs after the round.',
                     type(e).__name__, e)

  def _early_kss_vjp(self, call: _Call, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(beta, K_ss's vjp) from the leaders' sums of their members' K r (module docstring)."""
    with concurrent.futures.ThreadPoolExecutor(groups, thread_name_prefix='ntkdd-kr') as pool:
      sums = list(pool.map(lambda g: self._sum_k_r(call, g), range(groups)))
    solving = time.thread_time()
    beta, cotangent = self.early[0](summed_in_order(sums), self.alpha, self.inverse)
    self.solve_s += time.thread_time() - solving
    with self._changed:
      leaders = {g: worker for g, (worker, _) in self._leaders.items()}
    return beta, self.early[1](cotangent, leaders)

  def _sum_k_r(self, call: _Call, group: int) -> np.ndarray:
    """Group request `group`'s K r: its members' entries summed by its leader in block
    order (the leader's answer's additions)."""
    _, answer = self._ask_leader(
        call, group, protocol.SUM_CACHES, 'grad',
        lambda task: [f'{protocol.KR_CACHE}{i}' for i in self._kr_blocks(task)])
    return np.asarray(answer['grad'], np.float64)

  def _gather(self, call: _Call, group: int) -> tuple[list, np.ndarray]:
    """(its K_ss blocks, their values) of group request `group`."""
    task, answer = self._ask_leader(
        call, group, protocol.GATHER_CACHES, 'values',
        lambda task: [f'{KSS_CACHE}{b[0]}' for b in self._kss_blocks(task)])
    return self._kss_blocks(task), answer['values']

  def _kss_blocks(self, task: _Task) -> list:
    return [b for rows, cols, _ in task.blocks
            for b in self._kss_of[self._block_index[(rows, cols)]]]

  def _ask_leader(self, call: _Call, group: int, method: str, field: str,
                  names: Callable[[_Task], list]) -> tuple[_Task, dict]:
    """(the task, the answer with array `field`) of `method` (GATHER_CACHES or SUM_CACHES) for
    the cache entries `names(task)` of group request `group`, asked of whichever worker leads
    it now (waiting for one to be sent it, and again after a leader fails)."""
    failed = None
    while True:
      with self._changed:
        while (self._leaders.get(group, (failed,))[0] is failed
               and not call.finished.is_set() and group not in self._with_alpha):
          self._changed.wait(self.backend.poll_s)
        if (group not in self._leaders or self._leaders[group][0] is failed
            or (method == protocol.SUM_CACHES and group in self._with_alpha)):
          raise RuntimeError(f'Group request {group}: no leader holds its entries for '
                             f'{method} (the round ended, or it was re-sent with alpha).')
        worker, task = self._leaders[group]
      request = protocol.encode({'caches': [[worker.peer_id, name, self.version]
                                            for name in names(task)]})
      for _ in range(GATHER_ATTEMPTS):   # an answer without them (late entries): again
        try:
          answer = self.backend._call(worker, method, request)
        except _WorkerFault:   # down: its group request goes to another worker
          break
        if answer.get('ok') and isinstance(answer.get(field), np.ndarray):
          return task, answer
        if call.finished.is_set():
          break
      failed = worker   # ask whichever worker leads the group request next

  @staticmethod
  def _place(k_ss: np.ndarray, blocks: list, values: np.ndarray) -> None:
    """Puts gathered blocks ([j, r0, r1, c0, c1, ...], flattened in order) into K_ss, and
    their mirrors below the diagonal, as kernel() does."""
    offset = 0
    for _, r0, r1, c0, c1, *_ in blocks:
      size = (r1 - r0) * (c1 - c0)
      if offset + size > len(values):
        raise ValueError('gather_caches answered fewer values than its K_ss blocks hold')
      block = values[offset:offset + size].reshape(r1 - r0, c1 - c0)
      k_ss[r0:r1, c0:c1] = block
      if (r0, r1) != (c0, c1):
        k_ss[c0:c1, r0:r1] = block.T
      offset += size

  def _send_alpha(self, worker: _Worker, payload: bytes) -> None:
    """Sets alpha on a leader; one that fails has its request sent elsewhere, with alpha."""
    try:
      self.backend._call(worker, protocol.SET_IMAGES, protocol.ALPHA_CACHE, self.version,
                         payload)
    except _WorkerFault:
      pass
