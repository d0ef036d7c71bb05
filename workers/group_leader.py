"""A kernel worker leading a group of its peers: many blocks in one request, one answer back.

At hundreds of workers the coordinator's own CPU per request is the limit (BENCHMARKS.md,
"Scale simulation"), so with `DistributedKernels(group_size=g)` it sends one `group_blocks`
request per group of g workers per round instead of a few per worker. The worker that takes
it (the leader) hands the blocks to the group's members (itself included) over its peer
handles, a few in flight per member, each member pulling the next block when one is done, and
answers the whole group's work at once:

  kernel_block  the blocks' 'ntk' and 'nngp' values (or those of the `kernels` field),
                flattened and concatenated in block order;
  vjp_block     ONE partial gradient: 'grad' for the rows 'grad_rows' the blocks touch, the
                blocks' partial gradients summed in block order (so the result does not depend
                on which member computed which block).
  kip_targets   (the fused KIP step, protocol.KIP_TARGETS) the members' `kip_block` answers:
                'k_r' summed and 'predictions' concatenated in block order, and the gradient
                summed as for vjp_block, kept here as the cache entry `keep_grad` names
                ('kept', 'kept_by' answered) or, without it, answered.

The request (a wire message; see `group_request_fields` for the coordinator's side):
  method        'kernel_block', 'vjp_block', 'vjp_factors' (a vjp_block whose cotangents
                the leader forms per block from low-rank factors it caches, see below) or
                'kip_targets' (its blocks span every support row; fields `kernel`, `alpha`
                (n_s, C), `target_labels` (the blocks' columns, C, in block order) and
                optionally `keep_grad` {'name', 'version'}: see protocol.KIP_TARGETS; the
                overlapped step sends `alpha_cache` {'version'}, `kss_cache` {'name',
                'version'} and `kss_blocks` instead of `alpha`: see protocol.KIP_OVERLAP;
                the leader holds both for its members and the coordinator, and, with
                `kr_cache` and `kr_blocks`, its members' K r: protocol.KIP_EARLY_BETA).
  kernels       (optional, kernel_block) the kernels to answer, as in a block request.
  members       peer ids (str) of the group; the leader's own id may be among them.
  blocks        [[r0, r1, c0, c1, part], ...]: rows of the rows cache, columns of the call.
  parts         [{'start', 'cache', 'version'} or {'start', 'dataset'}, ...]: where the
                columns [start, ...) come from; a dataset part's indices are the array field
                `part<i>_indices` (the whole part, sliced per block here).
  rows_cache, rows_version   the row images' cache entry.
  caches        {name: version}: the cache entries the members must hold; the leader holds
                them (else it answers 'stale_cache' and the coordinator re-sends them) and
                passes them on: member p fetches from member (p - 1) // GROUP_FANOUT.
  pad_rows, pad_cols   (optional) every block's padded shape, as in a block request.
  g_ntk, g_nngp (vjp) the blocks' cotangents, flattened and concatenated in block order.
  cotangent_factors  (vjp_factors) {'g_ntk' / 'g_nngp': {'cache', 'version', 'rows'}}: the
                cache (protocol.FACTOR_CACHES, float64) holding `cotangents.pack`'s array of
                the whole cotangent and its rows; the leader must hold it (else 'stale_cache').
                Its members get plain vjp_block requests with their blocks' cotangents.
  tail, pair    (optional) tail true: a tail request sent beside its head
                (`DistributedKernels(requests_per_group=2)`), which carries the same `pair`
                (an int); the tail waits for its head to arrive (up to PAIR_WAIT_S), then its
                blocks start when no head request this worker leads has a block left to
                start, and each member takes one only while it has a lane free (the end of a
                round: while it is idle), so the head's answer travels while the tail computes.

A member that fails (raises, answers an error other than 'stale_cache') is dropped for the
rest of the request and its blocks go to the others; the answer's `dropped` field
({peer id: message}) tells the coordinator, which marks it down. A block that fails
MAX_BLOCK_ATTEMPTS times, or a group with no member left, fails the request.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Any, Optional

import numpy as np

from ntkdd.common import cotangents
from ntkdd.workers import protocol

GROUP_FANOUT = 4          # members fetching the caches from one member at once
LANES_PER_MEMBER = 2      # blocks in flight per member, so the next one is waiting (but
                          # at the end of a round)
MAX_BLOCK_ATTEMPTS = 3
PREFETCH_BELOW = 2        # a second lane takes a block only while more than this many per
                          # member are left: a block prefetched late waits behind its
                          # member's running one while the others run dry
PAIR_WAIT_S = 1.0         # how long a tail request waits for its head to arrive (the head
                          # is sent first, but the two may cross)
METHODS = ('kernel_block', 'vjp_block', protocol.VJP_FACTORS, protocol.KIP_TARGETS)
MEMBER_METHOD = {'kernel_block': 'kernel_block', 'vjp_block': 'vjp_block',
                 protocol.VJP_FACTORS: 'vjp_block',
                 protocol.KIP_TARGETS: protocol.KIP_BLOCK}   # what the members are asked per block


class GroupError(Exception):
  """A group request that cannot be served; `kind` is the answer's `error` field."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class GroupLeader:
  """Serves `group_blocks` requests for one worker (see the module docstring)."""

  def __init__(self, worker: Any):
    self.worker = worker
    self._pool = None
    self._lock = threading.Lock()
    self._held: dict[str, dict] = {}     # member peer id -> {cache name: version} it fetched
    # One condition for all the runs this worker leads: a tail run's lanes wait until the
    # head runs have started all their blocks.
    self.cond = threading.Condition()
    self.heads: list = []                # head runs in progress (guarded by `cond`)
    self.heads_seen: collections.deque = collections.deque(maxlen=64)   # their `pair` ids
    self.busy: collections.Counter = collections.Counter()   # member -> blocks in flight
    self._fetching: dict[str, threading.Lock] = {}   # member peer id -> its fetch lock

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            # a head and a tail run at once (requests_per_group=2)
            max_workers=2 * LANES_PER_MEMBER * (len(self.worker._peers) + 1),
            thread_name_prefix=f'ntkdd-group{self.worker.worker_id}')
      return self._pool

  def serve(self, request: dict) -> dict:
    method, members, blocks, block_requests, caches = _parse(request, self.worker)
    own = str(self.worker.worker_id)
    for name, version in caches.items():   # what the members fetch from us, we hold
      held = self.worker._images.get(name)
      if held is None or held[0] != version:
        raise GroupError(protocol.STALE_CACHE, f'Group leader {own}: cache {name!r} version '
                                           f'{version} requested, but it holds '
                                           f'{"nothing" if held is None else held[0]}.')
    if method == protocol.KIP_TARGETS and 'alpha_cache' in request:
      self._announce_overlap(request)
    tail = request.get('tail') is True
    run = _GroupRun(self, MEMBER_METHOD[method], members, block_requests, caches, tail)
    summed = None if method == 'kernel_block' else _OrderedSum(
        blocks, run.results, method == protocol.KIP_TARGETS)
    run.on_result = None if summed is None else summed.advance
    with self.cond:
      if not tail:
        self.heads.append(run)
        self.heads_seen.append(request.get('pair'))
        self.cond.notify_all()
      elif request.get('pair') is not None:   # sent beside its head: let the head go first
        self.cond.wait_for(lambda: request['pair'] in self.heads_seen, timeout=PAIR_WAIT_S)
    try:
      results, dropped = run.run()
    finally:
      if not tail:
        with self.cond:
          self.heads.remove(run)
          self.cond.notify_all()
    out: dict = {'dropped': dropped}
    if method == 'kernel_block':
      for name in _asked_kernels(request):
        out[name] = np.concatenate([results[i][name].reshape(-1) for i in range(len(blocks))])
      return out
    summed.advance()   # the sums are complete: every lane has finished
    if method == protocol.KIP_TARGETS:
      return {**out, **self._kip_answer(request, results, summed)}
    out.update(grad_rows=summed.rows.astype(np.int64), grad=summed.grad)
    return out

  def _announce_overlap(self, request: dict) -> None:
    """The overlapped step: alpha (from the coordinator) and the group's K_ss blocks (from
    its members) will arrive here, and so will the sum `keep_grad` names; reads of them
    (members' fetches, the coordinator's gather_caches, a worker's sum_caches) wait."""
    kss = request['kss_cache']   # checked by _parse
    names = [f'{kss["name"]}{b[0]}' for per_block in request['kss_blocks'] for b in per_block]
    self.worker.announce(names, kss['version'])
    self.worker.announce([protocol.ALPHA_CACHE], request['alpha_cache']['version'])
    kr_cache = request.get('kr_cache')
    if kr_cache is not None:   # checked by _parse: the members' K r (the early K_ss vjp)
      self.worker.announce([f'{protocol.KR_CACHE}{i}' for i in request['kr_blocks']],
                           kr_cache['version'])
    keep = request.get('keep_grad')
    if keep is not None:   # the coordinator's sum may ask for it before the round ends
      self.worker.announce([keep['name']], keep['version'])

  def _kip_answer(self, request: dict, results: list, summed: '_OrderedSum') -> dict:
    """A KIP_TARGETS answer: k_r summed and the predictions concatenated in block order;
    the gradient answered, or kept as the cache entry `keep_grad` names."""
    rows, grad, k_r = summed.rows, summed.grad, summed.k_r
    out = {'k_r': k_r, 'predictions': np.concatenate([r['predictions'] for r in results])}
    keep = request.get('keep_grad')
    if keep is None:
      return {**out, 'grad_rows': rows.astype(np.int64), 'grad': grad}
    self.worker.keep(keep['name'], keep['version'], grad)
    return {**out, 'kept': True, 'kept_by': str(self.worker.worker_id)}

  def ensure_member_caches(self, member: str, handle: Any, source: str,
                           caches: dict, force: bool = False) -> None:
    """Has `member` fetch `caches` from `source` (then from us) unless it holds them."""
    own = str(self.worker.worker_id)
    if member == own:
      return
    with self._lock:   # one fetch per member at a time: a head's and a tail's lanes share it
      member_lock = self._fetching.setdefault(member, threading.Lock())
    with member_lock:
      self._fetch_member_caches(member, handle, source, caches, force)

  def _fetch_member_caches(self, member: str, handle: Any, source: str, caches: dict,
                           force: bool) -> None:
    own = str(self.worker.worker_id)
    for name, version in caches.items():
      with self._lock:
        if not force and self._held.get(member, {}).get(name) == version:
          continue
      answer = {}
      for peer in dict.fromkeys((source, own)):   # a member's copy, else ours
        answer = protocol.decode(handle.fetch_images(name, version, peer))
        if answer.get('ok'):
          break
      if not answer.get('ok'):
        raise GroupError(answer.get('error', protocol.EXCEPTION),
                         f'member {member} could not fetch {name!r}: {answer.get("message")}')
      with self._lock:
        self._held.setdefault(member, {})[name] = version


class _OrderedSum:
  """A group run's partial gradients (and, for KIP_TARGETS, K r) added in block order as
  the answers arrive: the same additions in the same order as summing them at the end (so
  the same bits whichever member computed which block), but done while the other blocks
  compute, each block's gradient freed once added."""

  def __init__(self, blocks: list, results: list, with_k_r: bool):
    self.rows = np.unique(np.concatenate([np.arange(r0, r1) for r0, r1, *_ in blocks]))
    self.blocks, self.results, self.with_k_r = blocks, results, with_k_r
    self.grad = self.k_r = None
    self.added = 0
    self._lock = threading.Lock()

  def advance(self) -> None:
    """Adds the answers that continue the block order (called by lanes as answers land)."""
    with self._lock:
      while self.added < len(self.results) and self.results[self.added] is not None:
        result = self.results[self.added]
        r0, r1 = self.blocks[self.added][:2]
        if self.grad is None:
          self.grad = np.zeros((len(self.rows),) + result['grad'].shape[1:],
                               result['grad'].dtype)
        at = int(np.searchsorted(self.rows, r0))
        self.grad[at:at + (r1 - r0)] += result['grad']
        if self.with_k_r:
          self.k_r = result['k_r'].copy() if self.k_r is None else self.k_r + result['k_r']
        self.results[self.added] = {k: v for k, v in result.items() if k != 'grad'}
        self.added += 1


class _GroupRun:
  """One group request: lanes per member pulling blocks from a shared queue."""

  def __init__(self, leader: GroupLeader, method: str, members: list, block_requests: list,
               caches: dict, tail: bool = False):
    self.leader, self.method, self.members, self.tail = leader, method, members, tail
    self.requests, self.caches = block_requests, caches
    self.pending = collections.deque(range(len(block_requests)))
    self.results: list = [None] * len(block_requests)
    self.attempts = [0] * len(block_requests)
    self.done = 0
    self.dropped: dict[str, str] = {}
    self.error: Any = None
    self.cond = leader.cond
    self.ready = {m: threading.Event() for m in members}
    self.on_result = None   # called (no arguments) after each block's answer is stored

  def run(self) -> tuple[list, dict]:
    pool = self.leader._executor()
    futures = [pool.submit(self._lane, position, member, lane)
               for lane in range(LANES_PER_MEMBER) for position, member in enumerate(self.members)]
    with self.cond:
      while self.done < len(self.requests) and self.error is None:
        if len(self.dropped) == len(self.members):
          self.error = GroupError(protocol.EXCEPTION, f'every member of the group failed: '
                                                  f'{self.dropped}')
          break
        self.cond.wait()
      self.cond.notify_all()
    for future in futures:   # lanes exit once the run is over
      future.result()
    if self.error is not None:
      raise self.error
    return self.results, self.dropped

  def _lane(self, position: int, member: str, lane: int) -> None:
    start_cpu = time.thread_time()
    try:
      self._serve_lane(position, member, lane)
    except BaseException as e:  # a bug here must fail the request, not hang it
      with self.cond:
        self.error = self.error or GroupError(protocol.EXCEPTION, f'{type(e).__name__}: {e}')
        self.cond.notify_all()
    finally:
      hook = getattr(self.leader.worker, 'thread_cpu_hook', None)
      if hook is not None:
        hook(time.thread_time() - start_cpu)

  def _behind_heads(self, member: str) -> bool:
    """Whether a tail run's lane for `member` waits (the caller holds `cond`): while a head
    run of this leader has blocks to start, and while the member is busy with as many blocks
    as it has lanes, or with one when the blocks left are no more than the members (the end
    of a round: as the second-lane rule, across the two runs)."""
    if not self.tail:
      return False
    if any(run.pending and run.error is None for run in self.leader.heads):
      return True
    busy = self.leader.busy[member]
    return busy >= LANES_PER_MEMBER or (busy and len(self.pending) <= len(self.members))

  def _may_prefetch(self) -> bool:
    """Whether a second lane may take a block now (the caller holds `cond`): while there
    are more than PREFETCH_BELOW per member, or at least one for every member with a lane
    free (idle members included: each of them takes one anyway; queued now, a block starts
    as its member's running one ends, instead of a round trip to this leader later)."""
    if len(self.pending) > PREFETCH_BELOW * len(self.members):
      return True
    free = sum(1 for m in self.members
               if self.leader.busy[m] < LANES_PER_MEMBER and m not in self.dropped)
    return len(self.pending) >= free

  def _drop(self, member: str, message: str, index: Any = None) -> None:
    with self.cond:
      self.dropped.setdefault(member, message)
      if index is not None:
        self.pending.appendleft(index)
      self.ready[member].set()
      self.cond.notify_all()

  def _serve_lane(self, position: int, member: str, lane: int) -> None:
    worker = self.leader.worker
    handle = worker.member_handle(member)
    if handle is None:
      self._drop(member, f'not a peer of leader {worker.worker_id}')
      return
    if lane == 0:
      source = self.members[(position - 1) // GROUP_FANOUT] if position else member
      try:
        self.leader.ensure_member_caches(member, handle, source, self.caches)
      except Exception as e:  # down, or could not fetch: the others do its share
        self._drop(member, f'{type(e).__name__}: {e}')
        return
      self.ready[member].set()
    else:
      self.ready[member].wait()
    refetched = False
    while True:
      with self.cond:
        # A second lane takes a block only while there are more than the members can start:
        # at the end of a round a block queued behind its member's running one would wait
        # while other members sit idle.
        while ((not self.pending or (lane and not self._may_prefetch())
                or self._behind_heads(member))
               and self.done < len(self.requests) and self.error is None
               and member not in self.dropped):
          self.cond.wait()
        if self.error is not None or member in self.dropped or not self.pending:
          return
        index = self.pending.popleft()
        if not self.pending:   # a tail run's lanes may start now
          self.cond.notify_all()
        self.attempts[index] += 1
        if self.attempts[index] > MAX_BLOCK_ATTEMPTS:
          self.error = GroupError(protocol.EXCEPTION, f'block {index} failed {MAX_BLOCK_ATTEMPTS} '
                                                  f'times; dropped members: {self.dropped}')
          self.cond.notify_all()
          return
        self.leader.busy[member] += 1
      try:
        answer = protocol.decode(getattr(handle, self.method)(self.requests[index]()))
      except Exception as e:  # the member is down or answered garbage
        self._drop(member, f'{type(e).__name__}: {e}', index)
        return
      finally:
        with self.cond:
          self.leader.busy[member] -= 1
          self.cond.notify_all()
      if answer.get('ok'):
        with self.cond:
          self.results[index] = answer
          self.done += 1
          self.cond.notify_all()
        if self.on_result is not None:
          self.on_result()
        continue
      error = answer.get('error')
      if error == protocol.STALE_CACHE and not refetched:   # restarted: its caches are gone
        refetched = True
        with self.cond:
          self.attempts[index] -= 1
          self.pending.appendleft(index)
          self.cond.notify_all()
        try:
          self.leader.ensure_member_caches(member, handle, str(worker.worker_id), self.caches,
                                           force=True)
        except Exception as e:
          self._drop(member, f'{type(e).__name__}: {e}')
          return
        continue
      if error in (protocol.BAD_REQUEST, protocol.MALFORMED):   # our request is wrong: say so
        with self.cond:
          self.error = GroupError(error, f'member {member}: {answer.get("message")}')
          self.cond.notify_all()
        return
      self._drop(member, f'{error}: {answer.get("message")}', index)
      return


def _parse(request: dict, worker: Any) -> tuple:
  """(method, members, blocks, per-block request builders, caches) of a group request."""
  bad = protocol.BAD_REQUEST
  method, members = request.get('method'), request.get('members')
  blocks, parts = request.get('blocks'), request.get('parts')
  caches = request.get('caches') or {}
  if method not in METHODS:
    raise GroupError(bad, f'group_blocks needs method in {METHODS}, got {method!r}.')
  if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)
          and len(set(members)) == len(members)):
    raise GroupError(bad, 'group_blocks needs `members`: a non-empty list of distinct peer ids.')
  if not (isinstance(blocks, list) and blocks and isinstance(parts, list)
          and all(isinstance(b, list) and len(b) == 5 and all(isinstance(v, int) for v in b)
                  and 0 <= b[4] < len(parts) and b[0] < b[1] and b[2] < b[3] for b in blocks)):
    raise GroupError(bad, 'group_blocks needs `blocks` [[r0, r1, c0, c1, part], ...] with '
                          'non-empty ranges and part indices into `parts`.')
  if not (isinstance(caches, dict) and all(isinstance(v, int) for v in caches.values())):
    raise GroupError(bad, 'group_blocks `caches` must map cache names to int versions.')
  base = {'rows_cache': request.get('rows_cache'), 'rows_version': request.get('rows_version')}
  for pad in ('pad_rows', 'pad_cols'):
    if pad in request:
      base[pad] = request[pad]
  if method == 'kernel_block' and protocol.KERNELS_FIELD in request:
    base[protocol.KERNELS_FIELD] = list(_asked_kernels(request))
  flats = {name: request[name] for name in ('g_ntk', 'g_nngp')
           if method not in ('kernel_block', protocol.KIP_TARGETS)
           and isinstance(request.get(name), np.ndarray)}
  kip = _kip_fields(request, blocks, str(worker.worker_id)) \
      if method == protocol.KIP_TARGETS else None
  if kip is not None:
    base.update(kip['fields'])
  factors = _factors(request, worker) if method == protocol.VJP_FACTORS else {}
  for name, g in factors.items():
    if any(r1 > g.shape[0] or c1 > g.shape[1] for r0, r1, c0, c1, _ in blocks):
      raise GroupError(bad, f'{name}: the blocks reach outside its {g.shape} factors.')
  total = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1, _ in blocks)
  for name, flat in flats.items():
    if flat.ndim != 1 or len(flat) != total:
      raise GroupError(bad, f'{name} has shape {flat.shape}, expected ({total},): the blocks\' '
                            f'cotangents flattened in block order.')
  builders, offset, label_offset = [], 0, 0
  for r0, r1, c0, c1, p in blocks:
    part = parts[p]
    if not isinstance(part, dict) or not isinstance(part.get('start'), int):
      raise GroupError(bad, f'group_blocks part {p} is not {{"start": int, ...}}.')
    span = (c0 - part['start'], c1 - part['start'])
    fields = dict(base, rows_start=r0, rows_stop=r1)
    if 'dataset' in part:
      indices = request.get(f'part{p}_indices')
      if not isinstance(indices, np.ndarray) or indices.ndim != 1 or span[1] > len(indices) \
          or span[0] < 0:
        raise GroupError(bad, f'group_blocks part {p}: part{p}_indices must be a 1-d array '
                              f'covering columns {span}.')
      fields.update(cols_dataset=part['dataset'], cols_indices=indices[span[0]:span[1]])
    else:
      fields.update(cols_cache=part.get('cache'), cols_version=part.get('version'),
                    cols_start=span[0], cols_stop=span[1])
    pairs = (r1 - r0) * (c1 - c0)
    for name, flat in flats.items():
      fields[name] = flat[offset:offset + pairs].reshape(r1 - r0, c1 - c0)
    offset += pairs
    if kip is not None:   # the block's columns' labels, concatenated in block order
      fields['target_labels'] = kip['labels'][label_offset:label_offset + (c1 - c0)]
      label_offset += c1 - c0
      if kip['kss_blocks'] is not None:   # the overlapped step: this block's K_ss blocks
        fields['kss_blocks'] = kip['kss_blocks'][len(builders)]
      if kip['kr_push'] is not None:   # and where its K r goes (the early K_ss vjp)
        fields['kr_push'] = kip['kr_push'][len(builders)]
    builders.append(lambda fields=fields, at=(r0, r1, c0, c1): protocol.encode(
        {**fields, **_factor_blocks(factors, at, worker.dtype)}))
  return method, members, blocks, builders, caches


def _kip_fields(request: dict, blocks: list, own: str) -> dict:
  """A KIP_TARGETS request's per-column labels, its members' common fields (`kernel`, and
  `alpha`, or for the overlapped step `alpha_cache` and `kss_cache` naming this leader) and
  the overlapped step's K_ss blocks per block (else None), checked."""
  bad = protocol.BAD_REQUEST
  name, alpha, labels = (request.get(k) for k in ('kernel', 'alpha', 'target_labels'))
  alpha_cache, kss_cache, kss_blocks = (request.get(k) for k in ('alpha_cache', 'kss_cache',
                                                                 'kss_blocks'))
  keep = request.get('keep_grad')
  columns = sum(c1 - c0 for _, _, c0, c1, _ in blocks)
  n_s = blocks[0][1] if blocks else 0
  if name not in protocol.KERNEL_NAMES:
    raise GroupError(bad, f'{protocol.KIP_TARGETS} needs `kernel` in {protocol.KERNEL_NAMES}.')
  overlap = alpha_cache is not None
  if not (isinstance(labels, np.ndarray) and labels.ndim == 2 and len(labels) == columns and (
      overlap or isinstance(alpha, np.ndarray) and alpha.shape == (n_s, labels.shape[1]))):
    raise GroupError(bad, f'{protocol.KIP_TARGETS} needs `alpha` (n_s, C) (or `alpha_cache`) '
                          f'and `target_labels` ({columns}, C): one row per block column, in '
                          f'block order.')
  if any((r0, r1) != (0, n_s) for r0, r1, *_ in blocks):
    raise GroupError(bad, f'{protocol.KIP_TARGETS} blocks must span every support row '
                          f'[0, {n_s}).')
  if keep is not None and not (isinstance(keep, dict) and isinstance(keep.get('name'), str)
                               and isinstance(keep.get('version'), int)):
    raise GroupError(bad, '`keep_grad` must be {"name": str, "version": int}.')
  if not overlap:
    return {'labels': labels, 'fields': {'kernel': name, 'alpha': alpha}, 'kss_blocks': None,
            'kr_push': None}
  if not (isinstance(alpha_cache, dict) and isinstance(alpha_cache.get('version'), int)
          and isinstance(kss_cache, dict) and isinstance(kss_cache.get('name'), str)
          and isinstance(kss_cache.get('version'), int) and isinstance(kss_blocks, list)
          and len(kss_blocks) == len(blocks)
          and all(protocol.is_kss_block_list(per_block) for per_block in kss_blocks)):
    raise GroupError(bad, f'{protocol.KIP_TARGETS} with `alpha_cache` {{"version"}} needs '
                          f'`kss_cache` {{"name", "version"}} and `kss_blocks`: one list per '
                          f'block of [index, r0, r1, c0, c1, pad_rows, pad_cols].')
  fields = {'kernel': name,
            'alpha_cache': {'name': protocol.ALPHA_CACHE, 'version': alpha_cache['version'],
                            'source': own},
            'kss_cache': {'name': kss_cache['name'], 'version': kss_cache['version'],
                          'holder': own}}
  return {'labels': labels, 'fields': fields, 'kss_blocks': kss_blocks,
          'kr_push': _kr_pushes(request, len(blocks), own)}


def _kr_pushes(request: dict, n_blocks: int, own: str) -> Optional[list]:
  """Per block, where its member sends K r (protocol.KIP_EARLY_BETA), or None if the
  request does not ask for it."""
  kr_cache, kr_blocks = request.get('kr_cache'), request.get('kr_blocks')
  if kr_cache is None and kr_blocks is None:
    return None
  if not (isinstance(kr_cache, dict) and kr_cache.get('name') == protocol.KR_CACHE
          and isinstance(kr_cache.get('version'), int) and isinstance(kr_blocks, list)
          and len(kr_blocks) == n_blocks and all(isinstance(i, int) for i in kr_blocks)):
    raise GroupError(protocol.BAD_REQUEST,
                     f'{protocol.KIP_TARGETS} with `kr_cache` needs {{"name": '
                     f'{protocol.KR_CACHE!r}, "version": int}} and `kr_blocks`: one int per '
                     f'block.')
  return [{'name': f'{protocol.KR_CACHE}{index}', 'version': kr_cache['version'],
           'holder': own} for index in kr_blocks]


def _asked_kernels(request: dict) -> tuple:
  try:
    return protocol.asked_kernels(request)
  except ValueError as e:
    raise GroupError(protocol.BAD_REQUEST, str(e)) from e


def _factors(request: dict, worker: Any) -> dict:
  """{cotangent name: LowRankCotangent} of a vjp_factors request, from this worker's caches."""
  described = request.get('cotangent_factors')
  if not (isinstance(described, dict) and described
          and set(described) <= set(protocol.FACTOR_CACHES)):
    raise GroupError(protocol.BAD_REQUEST, f'{protocol.VJP_FACTORS} needs `cotangent_factors`: '
                                           f'{{name in {tuple(protocol.FACTOR_CACHES)}: '
                                           f'{{"cache", "version", "rows"}}}}.')
  out = {}
  for name, spec in described.items():
    if not (isinstance(spec, dict) and isinstance(spec.get('cache'), str)
            and isinstance(spec.get('version'), int) and isinstance(spec.get('rows'), int)):
      raise GroupError(protocol.BAD_REQUEST, f'cotangent_factors[{name!r}] must be '
                                             f'{{"cache": str, "version": int, "rows": int}}.')
    held = worker._images.get(spec['cache'])
    if held is None or held[0] != spec['version']:
      raise GroupError(protocol.STALE_CACHE, f'Group leader {worker.worker_id}: cache '
                                             f'{spec["cache"]!r} version {spec["version"]} '
                                             f'requested, but it holds '
                                             f'{"nothing" if held is None else held[0]}.')
    try:
      out[name] = cotangents.unpack(held[1], spec['rows'])
    except ValueError as e:
      raise GroupError(protocol.BAD_REQUEST, f'cotangent_factors[{name!r}]: {e}') from e
  return out


def _factor_blocks(factors: dict, at: tuple, dtype: np.dtype) -> dict:
  """Each factored cotangent's block `at` (r0, r1, c0, c1), formed here in `dtype`."""
  return {name: g.block(*at).astype(dtype) for name, g in factors.items()}
