"""Group requests: one request per group of kernel workers, led by one worker of the group."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ntkdd.common import cotangents
from ntkdd.server.kernel_tasks import ROWS, _Part, _Task, _Worker
from ntkdd.workers import protocol


class GroupRequests:
  """DistributedKernels' grouping of workers (a mixin: it uses the backend's `group_size`,
  `plan`, `_workers`, `_busy_groups`, `_lock` and `_add_stats`)."""


  def _groups(self, parts: list[_Part]) -> int:
    """Group requests per call: ceil(workers / group_size) if group_size > 1, every worker
    is wired to its peers and holds the call's dataset parts; else 0."""
    if self.group_size <= 1:
      return 0
    keys = {part.key for part in parts if part.kind == 'dataset'}
    with self._lock:
      if any(w.peer_id is None or not keys <= set(w.datasets) for w in self._workers):
        return 0
    return -(-len(self._workers) // self.group_size)

  def _group_fields(self, x1: np.ndarray, parts: list[_Part], caches: dict,
                    pads: Callable[[_Task], dict],
                    method: str) -> Callable[[_Task, _Worker], dict]:
    """task, leader -> the fields of a group request (workers/group_leader.py) but the
    cotangents: its blocks, where their columns come from, the members."""
    index = {id(part): i for i, part in enumerate(parts)}
    member_caches = dict(caches)   # what the members fetch (not the leader's factors)
    described = []
    for part in parts:
      if part.cache is not None:
        described.append({'start': part.start, 'cache': part.cache,
                          'version': caches[part.cache]})
      else:
        described.append({'start': part.start, 'dataset': part.key})
    fixed_pads = pads(None) if self.plan == 'tiles' else {}

    def fields(task: _Task, worker: _Worker) -> dict:
      blocks = [[r0, r1, c0, c1, index[id(part)]] for (r0, r1), (c0, c1), part in task.blocks]
      out = {'method': method, 'members': [w.peer_id for w in self._members(worker)],
             'blocks': blocks, 'parts': described, 'rows_cache': ROWS,
             'rows_version': caches[ROWS], 'caches': dict(member_caches), **fixed_pads}
      if task.is_tail:   # its leader starts its blocks when the head's are all started
        out['tail'] = True
      if task.pair is not None:   # a head and its tail
        out['pair'] = task.pair
      for i in sorted({b[4] for b in blocks}):
        if parts[i].kind == 'dataset':
          out[f'part{i}_indices'] = parts[i].indices
          self._add_stats(index_blocks=1)
      return out

    return fields

  def _publish_factors(self, factored: dict, caches: dict) -> dict:
    """Publishes each low-rank cotangent's packed factors as its cache (added to `caches`,
    so the leaders get them before their requests); the request field naming them.

    Raises:
      RuntimeError: a worker's ping does not list protocol.VJP_FACTORS (an older ntkdd,
        which would refuse the requests): run one version, or turn cotangent_factors off.
    """
    if not factored:
      return {}
    with self._lock:
      lacking = [w.index for w in self._workers
                 if protocol.VJP_FACTORS not in (w.info.get('features') or ())]
    if lacking:
      raise RuntimeError(f'Kernel workers {lacking} do not serve {protocol.VJP_FACTORS!r} '
                         f'requests (an older ntkdd?): run the same ntkdd version everywhere '
                         f'or build DistributedKernels with cotangent_factors=False.')
    described = {}
    for name, g in factored.items():
      cache = protocol.FACTOR_CACHES[name]
      caches[cache] = self._publish(cache, cotangents.pack(g)).version
      described[name] = {'cache': cache, 'version': caches[cache], 'rows': g.shape[0]}
    return {'cotangent_factors': described}

  def _members(self, leader: _Worker) -> list[_Worker]:
    """The leader, then the other alive workers of its group that have peers."""
    start = leader.index - leader.index % self.group_size
    with self._lock:
      return [leader] + [w for w in self._workers[start:start + self.group_size]
                         if w is not leader and w.alive and w.peer_id is not None]

  def _leads_group(self, worker: _Worker, slot: int) -> bool:
    """Whether this is the slot that takes group requests for `worker`'s group: slot 0 of
    its first alive worker with peers."""
    if slot:
      return False
    start = worker.index - worker.index % self.group_size
    with self._lock:
      for w in self._workers[start:start + self.group_size]:
        if w.alive and w.peer_id is not None:
          return w is worker
    return False

  def _claim_group(self, worker: _Worker) -> bool:
    """Whether `worker` may lead a group request now (its group leads none); claims it."""
    group = worker.index // self.group_size
    with self._lock:
      if group in self._busy_groups or not worker.alive or worker.peer_id is None:
        return False
      self._busy_groups.add(group)
      return True

  def _release_group(self, worker: _Worker) -> None:
    with self._lock:
      self._busy_groups.discard(worker.index // self.group_size)
