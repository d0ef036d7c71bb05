"""The fused KIP step over group requests: no coordinator barrier between a target block's
forward and its vjp (issue 18).

A KIP step's two rounds (`common/kip.py`: K(support, [support; targets]), the KRR solve, then
the vjp) meet at the coordinator: no vjp block starts before every kernel block is back. The
barrier is needed only for the small K_ss part. With alpha = A^-1 y_s known (A = K_ss + reg
tr/n I), a block of every support row against some target columns holds everything its own
part of the step needs: its predictions K^T alpha, their residuals r against the targets'
labels, and the cotangent alpha r^T of its vjp. So `kip_step` runs

  1. K_ss (a kernel call), alpha on the coordinator;
  2. one KIP_TARGETS group request per group (`workers/group_leader`): each member computes
     its blocks' kernel, residual and vjp in one call; the leader sums its members' partial
     gradients (every support row) and keeps the sum as a cache entry, answering only
     K_st r (n_s, C) and the predictions; one worker then sums the kept gradients over the
     workers' links (SUM_CACHES), so they do not all cross the coordinator's;
  3. beta = A^-1 sum(K_st r), and the vjp of K_ss with its cotangent
     -(beta alpha^T + alpha beta^T) + 2 (reg/n) tr(-beta alpha^T) I (low-rank factors).

The result equals the two-round step to float32 rounding (other block shapes and summation
orders), and is as reproducible: plans and sums follow the worker count, not timing.

`fused_step='overlap'` sends the fused round's requests before alpha is known and computes K_ss
inside that round (server/overlap_exchange.py): the same K_ss blocks, alpha, loss and
predictions, bit for bit, without the K_ss round's latency; beta comes from the inverse of the
regularised K_ss computed during the round (float64 rounding apart from the LU solve).
With `early_kss_vjp` (the default) the members also send their blocks' K r to their leaders
before their vjps, so beta is known mid-round and K_ss's vjp is sent then, each leader queueing
its share behind its fused blocks: the same bits, without the barrier before step 3.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Optional

import numpy as np

from ntkdd.common import krr
from ntkdd.server import block_plan, overlap_exchange
from ntkdd.server.kernel_tasks import _Call, _Task, _Worker, _WorkerFault
from ntkdd.workers import protocol

KEPT_GRAD = 'kip_grad'   # the cache names (one per group request) the leaders keep sums under
# The fused round's plan: one block per worker, no tail wave. Every fused block answers a
# partial gradient of every support row (n_s x image bytes, 6 MB at 500 support images of
# 32x32x3) to its leader: one block per member is one partial gradient per member per round
# (each member's sum of its share), so the leaders' links carry it once, at the end, and the
# members never wait between blocks for their answers to cross them. Against one share plus
# one wave of halves (two blocks per member), 256 simulated workers at 50 images per class:
# the step 75% -> 82% efficient with the K_ss plan and solve below (BENCHMARKS.md, round 6).
# The price: no balancing within a round (a member slower than the rest sets its group's end).
FUSED_TASKS_PER_WORKER, FUSED_TAIL_HALVINGS = 1, 0
# K_ss before the fused round: latency, not compute (10^4 to 10^5 pairs over the fleet, each
# member waiting for the support first): one block per worker, not the backend's plan of
# shares and halving waves (50 ipc: 5 blocks per member, the K_ss round 30 -> 24 ms).
K_SS_SHARES = (1, 0)


class FusedKipStep:
  """DistributedKernels' fused KIP step (a mixin: it uses the backend's kernel(), vjp() and
  group-request machinery)."""

  def kip_step(self, support_images: np.ndarray, target_images, support_labels: np.ndarray,
               target_labels: np.ndarray, reg: float,
               kernel_name: str = 'ntk') -> Optional[tuple]:
    """The KIP loss and its gradients for one target batch, fused (see the module docstring).

    Args:
      support_images: (n_s, ...) support images.
      target_images: the target batch: an array or `sources.DatasetRows` (sent as indices).
      support_labels, target_labels: (n_s, C) and (n_t, C).
      reg: the ridge lambda.
      kernel_name: 'ntk' or 'nngp'.

    Returns:
      (`krr.KrrGradients` with d_k_ss and d_k_ts None, the support images' gradient); None
      when the workers cannot serve the fused step now (no group requests, an older worker,
      a kept sum lost with its worker): the caller runs the two-round step instead.
    """
    x1 = self._as_images(support_images, 'x1')
    if not self._fused_groups(self._column_parts(x1, target_images)):
      return None
    y_s = np.asarray(support_labels, np.float64)
    y_t = np.asarray(target_labels, np.float64)

    def solve_alpha(k_ss: np.ndarray) -> np.ndarray:
      k_ss[...] = 0.5 * (k_ss + k_ss.T)
      # LU, not the two-round step's Cholesky path: a third of the coordinator's CPU between
      # rounds at 500 support images (bench/scale_sim.py), equal to float64 rounding.
      return krr.solve(k_ss, y_s, reg, method='lu')

    inverse, early_sum, early_result = None, {}, None
    if self.fused_overlap and self._serve_all(protocol.KIP_OVERLAP):
      def sum_early(leaders: dict, version: int) -> None:
        # Every leader has its request (it sent its K_ss blocks): the sum of their kept
        # gradients starts now, each fetched as its group ends, not after the whole round.
        early_sum['kept'] = [(leaders[g].peer_id, f'{KEPT_GRAD}{g}', version)
                             for g in sorted(leaders)]
        early_sum['future'] = _in_thread(self._sum_kept, x1, early_sum['kept'])

      early_vjp = None
      if self.early_kss_vjp and self._serve_all(protocol.KIP_EARLY_BETA):
        def kss_cotangent(k_r: np.ndarray, alpha: np.ndarray, inverse: np.ndarray) -> tuple:
          beta = inverse @ k_r   # as below, from the same K r, alpha and inverse: same bits
          return beta, _kss_cotangent(alpha, beta, y_t.shape[1], reg).dense()

        early_vjp = (kss_cotangent, lambda g_ss, leaders: self._vjp(
            x1, x1, **{f'g_{kernel_name}': g_ss}, strips=True, leaders=leaders))
      fused = self._fused_targets(
          x1, target_images, (solve_alpha, lambda k_ss: krr.inverse(k_ss, reg), sum_early,
                              early_vjp), y_t, kernel_name)
      if fused is None:
        return None
      # Alpha and the inverse were computed during the round, on the exchange's thread
      # (`overlap_cpu_s`): between the rounds only the calling thread's arithmetic below.
      kept, k_r, predictions, (k_ss, alpha, inverse, early_result), self.overlap_cpu_s = fused
      self.fused_solve_s = 0.0
    else:
      k_ss = self.kernel(x1, names=(kernel_name,), shares=K_SS_SHARES)[kernel_name].astype(
          np.float64)
      solving = time.thread_time()
      alpha = solve_alpha(k_ss)
      self.fused_solve_s = time.thread_time() - solving
      fused = self._fused_targets(x1, target_images, alpha, y_t, kernel_name)
      if fused is None:
        return None
      kept, k_r, predictions = fused[:3]
    # The kept sums meet on the workers' links while K_ss's vjp runs: neither needs the other.
    # (Overlapped: started during the round, unless a group request changed leaders since.)
    sum_future = early_sum.get('future') if early_sum.get('kept') == kept else None
    if sum_future is None:
      sum_future = _in_thread(self._sum_kept, x1, kept)
    solving = time.thread_time()
    residual = predictions - y_t
    loss = 0.5 * float(np.sum(residual * residual))
    if not np.isfinite(loss):
      raise FloatingPointError('The KIP loss is NaN or inf.')
    # The overlapped step has the inverse: beta by one product (float64 rounding apart).
    beta = inverse @ k_r if inverse is not None else krr.solve(k_ss, k_r, reg, method='lu')
    gradients = krr.KrrGradients(loss=loss, predictions=predictions, d_k_ss=None, d_k_ts=None,
                                 d_y_s=beta, alpha=alpha, residual=residual)
    if early_result is not None and np.array_equal(early_result[0], beta):
      self.fused_solve_s += time.thread_time() - solving
      grad_ss = early_result[1]   # queued mid-round by the exchange (overlap_exchange.py)
      self._add_stats(early_kss_vjps=1)
    else:
      if early_result is not None:   # cannot happen unless a worker's K r differs
        logging.warning('Early K_ss vjp: beta differs from the answers\' (max |diff| %.3g); '
                        'running K_ss\'s vjp again.', np.max(np.abs(early_result[0] - beta)))
      # The K_ss part of KIP's cotangent: its factors without the targets' rows.
      g_ss = _kss_cotangent(alpha, beta, y_t.shape[1], reg)
      # The coordinator's own arithmetic between its calls (bench/scale_sim.py counts it).
      self.fused_solve_s += time.thread_time() - solving
      # Dense: its n_s^2 entries go inside the group requests (40 KB at 100 support images),
      # one hop fewer than publishing factors to the leaders first.
      with self._call_lock:   # overlapped: in row strips, as the early K_ss vjp
        grad_ss = self._vjp(x1, x1, **{f'g_{kernel_name}': g_ss.dense()},
                            strips=self.fused_overlap)
    try:
      try:
        grad_targets = sum_future.result()
      except _WorkerFault:
        if 'future' not in early_sum:
          raise
        grad_targets = self._sum_kept(x1, kept)   # the early sum failed: once more, now
    except _WorkerFault as fault:   # a holder went down with its sum: redo the step
      logging.warning('Fused KIP step: %s; running the two rounds instead.', fault)
      return None
    return gradients, grad_targets + grad_ss

  def _fused_targets(self, x1: np.ndarray, target_images, alpha, y_t: np.ndarray,
                     kernel_name: str) -> Optional[tuple]:
    """(the kept sums [(holder, name, version), ...] in plan order, K_st r, predictions),
    or None if groups cannot serve. `alpha`: the array, or (the overlapped step) the functions
    (K_ss -> alpha, K_ss -> the regularised inverse, ({group: leader}, version) -> None once
    alpha is sent) and the early K_ss vjp's pair or None (OverlapExchange's `early`); then also
    (K_ss, alpha, the inverse, (beta, K_ss's vjp) or None) and the exchange's CPU seconds."""
    start = time.perf_counter()
    with self._call_lock:
      parts = self._column_parts(x1, target_images)
      groups = self._fused_groups(parts)
      if not groups:   # a worker went down meanwhile
        return None
      n_s, n_t = len(x1), parts[0].stop
      planned = block_plan.column_blocks(n_s, (0, n_t), len(self._workers),
                                         FUSED_TASKS_PER_WORKER, FUSED_TAIL_HALVINGS)
      blocks = [(rows, cols, parts[0]) for rows, cols, _ in planned]
      _, caches, _ = self._sources(x1, parts, 1)
      group_fields = self._group_fields(x1, parts, caches, lambda task: {},
                                        protocol.KIP_TARGETS)
      version = self._version_fn()
      exchange = None
      if isinstance(alpha, tuple):   # overlapped: K_ss in this round, alpha sent mid-round
        kss_blocks, kss_pads = self._plan_blocks(n_s, self._column_parts(x1, None), True,
                                                 K_SS_SHARES)
        exchange = overlap_exchange.OverlapExchange(self, kss_blocks, kss_pads, blocks,
                                                    version, *alpha)
        alpha_fields = exchange.fields
      else:
        alpha_fields = lambda task, worker, alpha=alpha: {'alpha': alpha}
      k_r: dict[int, np.ndarray] = {}
      kept_by: dict[int, str] = {}
      predictions = np.zeros_like(y_t)

      def build(task: _Task, worker: _Worker) -> dict:
        labels = np.concatenate([y_t[c0:c1] for _, (c0, c1), _ in task.blocks])
        return {**group_fields(task, worker), 'kernel': kernel_name,
                **alpha_fields(task, worker), 'target_labels': labels,
                'keep_grad': {'name': f'{KEPT_GRAD}{task.index}', 'version': version}}

      def deliver(task: _Task, response: dict) -> None:
        offset = 0
        flat = response['predictions']
        width = sum(c1 - c0 for _, (c0, c1), _ in task.blocks)
        if not (isinstance(flat, np.ndarray) and flat.shape == (width, y_t.shape[1])
                and response.get('kept') is True and isinstance(response.get('kept_by'), str)):
          raise ValueError('a kip_targets answer needs predictions of its columns and '
                           'kept_by')
        k_r[task.index] = np.asarray(response['k_r'], np.float64).reshape(n_s, y_t.shape[1])
        kept_by[task.index] = response['kept_by']
        for _, (c0, c1), _ in task.blocks:
          predictions[c0:c1] = flat[offset:offset + c1 - c0]
          offset += c1 - c0

      call = _Call(protocol.GROUP_BLOCKS, caches, build, deliver)
      if exchange is not None:
        exchange.start(call, min(groups, len(blocks)))
      self._run(call, blocks, groups)
      order = [task.index for task in call.tasks]   # plan order: reproducible sums
      total_k_r = overlap_exchange.summed_in_order([k_r[index] for index in order])
    self._count(n_s * n_t, start)
    kept = [(kept_by[i], f'{KEPT_GRAD}{i}', version) for i in order]
    if exchange is None:
      return kept, total_k_r, predictions
    return kept, total_k_r, predictions, exchange.result(), exchange.solve_s

  def _serve_all(self, feature: str) -> bool:
    """Whether every worker's ping lists `feature` (else logged once)."""
    with self._lock:
      lacking = [w.index for w in self._workers
                 if feature not in (w.info.get('features') or ())]
    if lacking and getattr(self, '_lacking_logged', None) != (feature, lacking):
      logging.info('Workers %s do not serve %r; the fused step runs without it.', lacking,
                   feature)
      self._lacking_logged = (feature, lacking)
    return not lacking

  def _fused_groups(self, parts: list) -> int:
    """Group requests per call for the fused round over these target parts, or 0 (then
    logged once per reason): one part, group requests possible, every worker serving it."""
    with self._lock:
      lacking = [w.index for w in self._workers
                 if protocol.KIP_TARGETS not in (w.info.get('features') or ())]
    groups = self._groups(parts) if len(parts) == 1 and not lacking else 0
    if not groups:
      reason = (f'workers {lacking} do not serve it' if lacking else
                'no group requests (group_size 1, or workers without peers or the data)')
      if reason != getattr(self, '_fused_unavailable', None):
        logging.info('Fused KIP step unavailable: %s; running the two rounds.', reason)
        self._fused_unavailable = reason
    return groups

  def _sum_kept(self, x1: np.ndarray, kept: list) -> np.ndarray:
    """The sum of the kept gradients, in `kept`'s order, computed by the first one's holder
    (the others' sums cross the workers' links to it); its alive peers if it fails."""
    with self._lock:
      by_peer = {w.peer_id: w for w in self._workers if w.peer_id is not None}
    request = protocol.encode({'caches': [list(entry) for entry in kept]})
    candidates = [by_peer[peer] for peer in dict.fromkeys(p for p, _, _ in kept)]
    errors = []
    for worker in candidates:
      if not worker.alive:
        continue
      try:
        answer = self._call(worker, protocol.SUM_CACHES, request)
      except _WorkerFault as fault:
        errors.append(f'worker {worker.index}: {fault}')
        continue
      if answer.get('ok') and isinstance(answer.get('grad'), np.ndarray) and (
          answer['grad'].shape == x1.shape):
        return np.asarray(answer['grad'], self.dtype)
      errors.append(f'worker {worker.index}: {answer.get("error")}: {answer.get("message")}')
    raise _WorkerFault(f'no worker could sum the kept gradients: {errors}')


def _kss_cotangent(alpha: np.ndarray, beta: np.ndarray, classes: int, reg: float):
  """The K_ss part of KIP's cotangent (`krr.kip_cotangent_factors` without the targets' rows)
  from alpha and beta."""
  return krr.kip_cotangent_factors(
      krr.KrrGradients(loss=0.0, predictions=None, d_k_ss=None, d_k_ts=None, d_y_s=beta,
                       alpha=alpha, residual=np.zeros((0, classes), np.float64)), reg)


def _in_thread(fn, *args) -> concurrent.futures.Future:
  """fn(*args) on a thread of its own; its future."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='ntkdd-sum')
  future = pool.submit(fn, *args)
  pool.shutdown(wait=False)
  return future
