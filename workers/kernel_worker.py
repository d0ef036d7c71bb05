"""A kernel worker: computes NTK/NNGP blocks and their vjp for wire-encoded requests.

Every public method takes and returns `bytes` (plus ints and strs), never numpy arrays, so the
same class serves in-process handles and Courier RPC (where numpy arguments hang).

A worker built with `pin_core=True` first pins all its threads to one CPU core, the
(worker_id mod n)-th of the cores it may use (`workers/cpu_pinning`; `--pin-workers`); its ping
reports the core.

A worker built with a `dataset` spec (`common/prepared.DataSpec` as a dict) loads and
preprocesses that dataset itself, once, from its own data dir, and holds each split under its
content key (`PreparedData.key`), which `ping` reports. A block request (see workers/protocol.py)
names its row and column images, each either inline (an array field `rows` / `cols`), from the
worker's image cache (fields `rows_cache`, `rows_version`, `rows_start`, `rows_stop`, and the
same with `cols_`), or as rows of a dataset split the worker holds (`cols_dataset` = the key,
`cols_indices`). `pad_rows` / `pad_cols`
pad the block to a fixed shape, so each block shape compiles once. A vjp request adds the
cotangent blocks `g_ntk` / `g_nngp` (either may be absent). A kernel request's optional
`kernels` (protocol.KERNELS_FIELD) names the kernels to answer (default both); `ping` lists
the optional request features it serves under `features` (protocol.FEATURES).

Responses carry `ok`. On failure they carry `error`: 'stale_cache' when a request names a
cache entry (name, version) the worker does not hold (the coordinator re-sends the images),
'missing_dataset' when it names a dataset key the worker does not hold (the coordinator then
sends pixels), 'malformed_message' for bytes that are not a well-formed wire message (see
workers/protocol.py: refused before anything is allocated), 'bad_request' for a well-formed request
this worker cannot serve (a block side or padding over MAX_BLOCK_SIDE included, so no request
makes it allocate without bound) or 'exception', and a human-readable `message`. No request
ends the worker: every failure is an answer.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Optional

import jax
import numpy as np

from ntkdd.common import architectures, kernels, prepared
from ntkdd.workers import cpu_pinning, group_leader, protocol

STALE_CACHE, MISSING_DATASET = protocol.STALE_CACHE, protocol.MISSING_DATASET
BAD_REQUEST, EXCEPTION, MALFORMED = protocol.BAD_REQUEST, protocol.EXCEPTION, protocol.MALFORMED
MAX_BLOCK_SIDE = 1 << 16    # rows (or columns) of one block, padding included


GATHER_THREADS = 16   # peers sum_caches fetches from at once
PEER_WAIT_S = 30.0    # how long cached_images waits for a version this worker is fetching
PEER_ANNOUNCE_S = 1.0   # ... and for one it has not started fetching yet


class RequestError(Exception):
  """A request this worker cannot serve; `kind` is the response's `error` field."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def error_response(kind: str, message: str) -> bytes:
  return protocol.encode({'ok': False, 'error': kind, 'message': message})


class KernelWorker:
  """One worker per device: caches named image arrays and computes blocks of them."""

  def __init__(self, arch: dict, dtype: str = 'float32', tile: Optional[int] = None,
               worker_id: int = 0, dataset: Optional[dict] = None, pin_core: bool = False):
    # Before any JAX computation: XLA sizes its CPU thread pool from the cores allowed then.
    self.core = cpu_pinning.pin_process(worker_id) if pin_core else None
    if self.core is not None:
      logging.info('Worker %d pinned to CPU core %d.', worker_id, self.core)
    kernels.enable_float64_if(dtype)
    self.arch = architectures.Architecture.from_dict(arch)
    self.dtype = np.dtype(dtype)
    self.tile = tile
    self.worker_id = worker_id
    self._images: dict[str, tuple[int, np.ndarray]] = {}   # name -> (version, images)
    self._lock = threading.Lock()     # the coordinator may call from several threads
    self.blocks_done = 0
    self.compute_seconds = 0.0
    self._datasets: dict[str, np.ndarray] = {}   # split key -> model-space images
    self._peers: dict = {}            # peer worker id (str) -> handle, for fetch_images
    self._self_handle = None          # this worker as its peers reach it (group_blocks)
    self._group_leader: Optional[group_leader.GroupLeader] = None
    self.thread_cpu_hook = None       # called with the CPU seconds of each group lane thread
    self._arriving: dict[str, int] = {}   # cache name -> version being fetched from a peer
    self._cache_changed = threading.Condition(self._lock)
    self.dataset_error: Optional[str] = None
    if dataset:
      self._load_dataset(dataset)

  def _load_dataset(self, spec: dict) -> None:
    """Holds the spec's splits by content key; a failure is reported, not fatal (the
    coordinator then sends pixels)."""
    try:
      data = prepared.prepare(prepared.DataSpec.from_dict(spec))
      for split in prepared.SPLITS:
        self._datasets[data.key(split)] = data.split(split).astype(self.dtype, copy=False)
      logging.info('Worker %d holds %s: %s.', self.worker_id, spec.get('dataset'),
                   {k: v.shape for k, v in self._datasets.items()})
    except Exception as e:  # missing files, bad flags: say so in ping, serve pixels
      self.dataset_error = f'{type(e).__name__}: {e}'
      logging.warning('Worker %d could not load its dataset (%s); it will be sent images.',
                      self.worker_id, self.dataset_error)

  # -- RPC methods: bytes in, bytes out. ------------------------------------------------------

  def ping(self) -> bytes:
    """Who and how busy this worker is, and which cache versions it holds."""
    with self._lock:
      caches = {name: version for name, (version, _) in self._images.items()}
      blocks_done, seconds = self.blocks_done, self.compute_seconds
    return protocol.encode({'ok': True, 'worker_id': self.worker_id, 'pid': os.getpid(),
                        'blocks_done': blocks_done, 'compute_seconds': seconds,
                        'device': str(jax.devices()[0]), 'dtype': self.dtype.name,
                        'arch': self.arch.to_dict(), 'caches': caches,
                        'datasets': {key: len(x) for key, x in self._datasets.items()},
                        'dataset_error': self.dataset_error, 'peers': len(self._peers),
                        'core': self.core,
                        'features': list(protocol.FEATURES)})

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    """Caches the array `images` of the wire message `payload` as (`name`, `version`)."""
    try:
      if not isinstance(name, str) or not isinstance(version, int) or isinstance(version, bool):
        raise RequestError(BAD_REQUEST, 'set_images needs a str name and an int version.')
      images = protocol.decode(payload).get('images')
      if (not isinstance(images, np.ndarray) or images.ndim not in (2, 4)
          or images.dtype.kind not in 'biuf'):
        raise RequestError(BAD_REQUEST, 'set_images needs a numeric `images` array, NHWC or '
                                        '(N, D).')
      if not protocol.keeps_float64(name):   # factors, alpha, K r keep float64's digits
        images = images.astype(self.dtype, copy=False)
    except protocol.WireError as e:
      return self._refuse(MALFORMED, f'set_images: {e}')
    except RequestError as e:
      return self._refuse(e.kind, str(e))
    except Exception as e:  # never the end of the worker
      logging.exception('Worker %d: set_images failed.', self.worker_id)
      return error_response(EXCEPTION, f'Worker {self.worker_id}: {type(e).__name__}: {e}')
    with self._lock:
      self._images[name] = (int(version), images)
      self._cache_changed.notify_all()
    logging.debug('Worker %d cached %r version %d: %s.', self.worker_id, name, version,
                  images.shape)
    return protocol.encode({'ok': True, 'name': name, 'version': int(version)})

  def cached_images(self, name: str, version: int) -> bytes:
    """The cache entry (`name`, `version`) as a set_images payload, for a peer to fetch.

    While this worker is itself still fetching that version, it waits for it (up to
    PEER_WAIT_S), so a fetch can start before its source holds the images (cut-through);
    a version it has not heard of it awaits PEER_ANNOUNCE_S (its own fetch may be on the way).
    """
    try:
      return protocol.encode({'ok': True, 'images': self._wait_held(name, int(version))})
    except RequestError as e:
      return error_response(e.kind, f'Worker {self.worker_id}: {e}')

  def _wait_held(self, name: str, version: int) -> np.ndarray:
    """The array of cache entry (`name`, `version`), waiting PEER_WAIT_S for one announced
    as on its way (`announce`, or this worker fetching it), PEER_ANNOUNCE_S for another.

    Raises:
      RequestError: 'stale_cache' if it is not here by then.
    """
    start = time.monotonic()
    with self._lock:
      while self._images.get(name, (None,))[0] != version:
        waited = time.monotonic() - start
        limit = PEER_WAIT_S if self._arriving.get(name) == version else PEER_ANNOUNCE_S
        if waited >= limit:
          break
        self._cache_changed.wait(limit - waited)
      held = self._images.get(name)
    if held is None or held[0] != version:
      have = 'nothing' if held is None else f'version {held[0]}'
      raise RequestError(STALE_CACHE, f'cache {name!r} version {version} asked for, but it '
                                      f'holds {have}.')
    return held[1]

  def announce(self, names: list, version: int) -> None:
    """Not an RPC: the cache entries (`names`, `version`) are on their way here (sent by
    peers or the coordinator), so reads of them wait PEER_WAIT_S (the overlapped fused step's
    K_ss blocks and alpha, which its group leader holds)."""
    with self._lock:
      for name in names:
        self._arriving[name] = int(version)
      self._cache_changed.notify_all()

  def fetch_images(self, name: str, version: int, peer: str) -> bytes:
    """Caches (`name`, `version`) fetched from the peer worker `peer` (the tree broadcast).

    Answers as set_images; when the peer cannot serve, its error (e.g. 'stale_cache') with
    a message naming the peer, and the coordinator fetches elsewhere.
    """
    handle = self._peers.get(str(peer))
    if handle is None:
      return error_response(BAD_REQUEST, f'Worker {self.worker_id} has no peer {peer!r} '
                                         f'(peers: {sorted(self._peers)}).')
    with self._lock:
      self._arriving[name] = int(version)
      self._cache_changed.notify_all()
    try:
      try:
        payload = handle.cached_images(name, int(version))
        answer = protocol.decode(payload)
      except Exception as e:  # the peer is down or answered garbage: its fault, not ours
        return error_response(EXCEPTION, f'Worker {self.worker_id}: peer {peer} failed: '
                                         f'{type(e).__name__}: {e}')
      if not answer.get('ok'):
        return error_response(answer.get('error', EXCEPTION),
                              f'Worker {self.worker_id}: peer {peer}: {answer.get("message")}')
      return self.set_images(name, version, payload)
    finally:
      with self._lock:
        if self._arriving.get(name) == int(version):
          del self._arriving[name]
        self._cache_changed.notify_all()

  def connect_peers(self, peers: dict) -> None:
    """Not an RPC: the launcher hands this worker its peers' handles, {worker id: handle}
    (its own handle among them, if given, serves the blocks it leads for itself)."""
    self._peers = {str(k): h for k, h in peers.items() if str(k) != str(self.worker_id)}
    self._self_handle = peers.get(self.worker_id, peers.get(str(self.worker_id)))

  def member_handle(self, peer: str):
    """How this worker, leading a group, calls member `peer` (itself included); None if
    it is no peer."""
    if str(peer) == str(self.worker_id):
      return self._self_handle or self
    return self._peers.get(str(peer))

  def kernel_block(self, request: bytes) -> bytes:
    """{'ntk', 'nngp'}: the (rows, cols) kernel blocks of the request's images."""
    return self._serve(request, self._asked_kernels)

  def vjp_block(self, request: bytes) -> bytes:
    """{'grad'}: d/d rows of <g_ntk, NTK(rows, cols)> + <g_nngp, NNGP(rows, cols)>."""
    return self._serve(request, self._vjp_block)

  def kip_block(self, request: bytes) -> bytes:
    """{'grad', 'k_r', 'predictions'}: one block of the fused KIP step (protocol.KIP_TARGETS):
    its kernel, the residuals of its columns and the vjp of alpha r^T."""
    return self._serve(request, self._kip_block)

  def sum_caches(self, request: bytes) -> bytes:
    """{'grad'}: the sum, in the order given, of the cache entries `caches` ([[peer id, name,
    version], ...]) fetched from those peers (this worker's own read here)."""
    return self._serve(request, self._sum_caches)

  def gather_caches(self, request: bytes) -> bytes:
    """{'values'}: the cache entries `caches` ([[peer id, name, version], ...]) flattened and
    concatenated in the order given (the overlapped fused step's K_ss blocks), this worker's
    own waited for while announced."""
    return self._serve(request, self._gather_caches)

  def group_blocks(self, request: bytes) -> bytes:
    """Many blocks led over this worker's group (workers/group_leader.py): the blocks'
    kernels concatenated, or one partial-gradient sum ('grad', 'grad_rows')."""
    return self._serve(request, self._group_blocks)

  def _group_blocks(self, request: dict) -> dict:
    if self._group_leader is None:
      self._group_leader = group_leader.GroupLeader(self)
    try:
      return self._group_leader.serve(request)
    except group_leader.GroupError as e:
      raise RequestError(e.kind, str(e)) from e

  # -- Block computations. --------------------------------------------------------------------

  def _refuse(self, kind: str, message: str) -> bytes:
    """The error answer of a refused request; malformed bytes are logged here too."""
    if kind == MALFORMED:
      logging.warning('Worker %d refused a malformed message: %s', self.worker_id, message)
    return error_response(kind, f'Worker {self.worker_id}: {message}')

  def _serve(self, request: bytes, compute) -> bytes:
    start = time.perf_counter()
    try:
      response = compute(protocol.decode(request))
    except protocol.WireError as e:
      return self._refuse(MALFORMED, str(e))
    except RequestError as e:
      return self._refuse(e.kind, str(e))
    except Exception as e:  # Reported to the coordinator, which retries elsewhere.
      logging.exception('Worker %d failed on a block.', self.worker_id)
      return error_response(EXCEPTION, f'Worker {self.worker_id}: {type(e).__name__}: {e}')
    seconds = time.perf_counter() - start
    with self._lock:
      self.blocks_done += 1
      self.compute_seconds += seconds
    response.update(ok=True, seconds=seconds)
    return protocol.encode(response)

  def _asked_kernels(self, request: dict) -> dict:
    """The block's kernels named by the request's `kernels` field (absent: both)."""
    try:
      names = protocol.asked_kernels(request)
    except ValueError as e:
      raise RequestError(BAD_REQUEST, str(e)) from e
    out = self._kernel_block(request)
    return {name: out[name] for name in names}

  def _kernel_block(self, request: dict) -> dict:
    rows, cols = self._images_for(request, 'rows'), self._images_for(request, 'cols')
    pad_rows, pad_cols = _pad_size(request, 'rows', rows), _pad_size(request, 'cols', cols)
    diagonal = _same_source(request) and pad_rows == pad_cols
    padded_rows = kernels.pad_rows(rows, pad_rows)
    # A diagonal block of K(x, x) is itself symmetric: compute_kernel(x, None) mirrors it.
    padded_cols = None if diagonal else kernels.pad_rows(cols, pad_cols)
    out = kernels.compute_kernel(self.arch, padded_rows, padded_cols, tile=self.tile,
                                 dtype=self.dtype.name)
    return {name: out[name][:len(rows), :len(cols)] for name in kernels.KERNELS}

  def _vjp_block(self, request: dict) -> dict:
    rows, cols = self._images_for(request, 'rows'), self._images_for(request, 'cols')
    pad_rows, pad_cols = _pad_size(request, 'rows', rows), _pad_size(request, 'cols', cols)
    cotangents = {}
    for name in ('g_ntk', 'g_nngp'):
      g = request.get(name)
      if g is None:
        cotangents[name] = None
        continue
      if not isinstance(g, np.ndarray) or g.shape != (len(rows), len(cols)):
        raise RequestError(BAD_REQUEST, f'{name} has shape {getattr(g, "shape", None)}, '
                                        f'expected {(len(rows), len(cols))}.')
      # Zero cotangents on padded pairs: they contribute nothing to the gradient.
      cotangents[name] = kernels.pad_matrix(g.astype(self.dtype), pad_rows, pad_cols)
    grad = kernels.kernel_vjp(self.arch, kernels.pad_rows(rows, pad_rows),
                              kernels.pad_rows(cols, pad_cols), tile=self.tile,
                              dtype=self.dtype.name, **cotangents)
    return {'grad': grad[:len(rows)]}

  def _kip_block(self, request: dict) -> dict:
    name = request.get('kernel')
    if name not in protocol.KERNEL_NAMES:
      raise RequestError(BAD_REQUEST, f'kip_block needs `kernel` in {protocol.KERNEL_NAMES}, '
                                      f'got {name!r}.')
    labels = request.get('target_labels')
    alpha = request.get('alpha') if 'alpha_cache' not in request else None
    if not (isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.dtype.kind == 'f'
            and (alpha is None or isinstance(alpha, np.ndarray) and alpha.ndim == 2
                 and alpha.shape[1] == labels.shape[1] and alpha.dtype.kind == 'f')):
      raise RequestError(BAD_REQUEST, 'kip_block needs float arrays `alpha` (rows, C) (or '
                                      '`alpha_cache`) and `target_labels` (columns, C).')
    if 'kss_blocks' in request:   # the overlapped step: K_ss first, for alpha
      self._kss_blocks(request, name)
    rows_start, rows_stop = request.get('rows_start'), request.get('rows_stop')
    kernel = self._kernel_block(request)[name]
    if alpha is None:   # the forward is done: now alpha is needed
      alpha = self._await_alpha(request.get('alpha_cache'))
      if alpha.ndim != 2 or alpha.shape[1] != labels.shape[1]:
        raise RequestError(BAD_REQUEST, f'kip_block: alpha has shape {alpha.shape}, the '
                                        f'labels {labels.shape}.')
    if kernel.shape != (len(alpha), len(labels)) or (rows_start, rows_stop) != (0, len(alpha)):
      raise RequestError(BAD_REQUEST, f'kip_block: a {kernel.shape} block needs every support '
                                      f'row (rows [0, {len(alpha)})) and one label per column '
                                      f'({len(labels)} given).')
    kernel = kernel.astype(np.float64)
    alpha = alpha.astype(np.float64, copy=False)
    predictions = kernel.T @ alpha
    residual = predictions - labels
    k_r = kernel @ residual
    if 'kr_push' in request:   # the early K_ss vjp: the leader sums these during the round
      push = request['kr_push']
      if not (isinstance(push, dict) and isinstance(push.get('name'), str)
              and push['name'].startswith(protocol.KR_CACHE)
              and isinstance(push.get('version'), int) and isinstance(push.get('holder'), str)):
        raise RequestError(BAD_REQUEST, f'kr_push must be {{"name": {protocol.KR_CACHE!r} + '
                                        f'index, "version": int, "holder": peer id}}.')
      self._push(push['holder'], push['name'], push['version'], k_r)
    # dL/dK of 1/2 ||K^T alpha - y||^2 for this block: alpha r^T (common/krr.py).
    cotangent = (alpha @ residual.T).astype(self.dtype)
    grad = self._vjp_block({**request, f'g_{name}': cotangent})['grad']
    return {'grad': grad, 'k_r': k_r, 'predictions': predictions}

  def _kss_blocks(self, request: dict, name: str) -> None:
    """The overlapped step's K_ss blocks of a kip_block request (`kss_blocks` [[index, r0,
    r1, c0, c1, pad_rows, pad_cols], ...], `kss_cache` {'name', 'version', 'holder'}), each
    computed as a kernel_block request of the rows cache against itself and sent to the holder
    as the cache entry (name + str(index), version)."""
    blocks, cache = request.get('kss_blocks'), request.get('kss_cache')
    if not (protocol.is_kss_block_list(blocks) and isinstance(cache, dict)
            and isinstance(cache.get('name'), str) and isinstance(cache.get('version'), int)
            and isinstance(cache.get('holder'), str)):
      raise RequestError(BAD_REQUEST, 'kss_blocks must be [[index, r0, r1, c0, c1, pad_rows, '
                                      'pad_cols], ...] with kss_cache {"name", "version", '
                                      '"holder"}.')
    for index, r0, r1, c0, c1, pad_rows, pad_cols in blocks:
      sub = {'rows_cache': request.get('rows_cache'), 'rows_version': request.get('rows_version'),
             'rows_start': r0, 'rows_stop': r1, 'cols_cache': request.get('rows_cache'),
             'cols_version': request.get('rows_version'), 'cols_start': c0, 'cols_stop': c1,
             'pad_rows': pad_rows, 'pad_cols': pad_cols}
      block = self._kernel_block(sub)[name]
      self._push(cache['holder'], f'{cache["name"]}{index}', cache['version'], block)

  def _push(self, holder: str, name: str, version: int, array: np.ndarray) -> None:
    """Sends `array` to worker `holder` as its cache entry (`name`, `version`) without
    waiting (the device goes on with the block's forward); kept here if `holder` is us."""
    if holder == str(self.worker_id):
      self.keep(name, version, array)
      return
    handle = self._peers.get(holder)
    if handle is None:
      raise RequestError(BAD_REQUEST, f'Worker {self.worker_id} has no peer {holder!r}.')
    payload = protocol.encode({'images': array})

    def send():
      try:
        handle.set_images(name, version, payload)
      except Exception as e:  # its gather then fails, and the coordinator gathers again
        logging.warning('Worker %d could not send %r to %s: %s', self.worker_id, name,
                        holder, e)
    self._without_waiting(send)

  def _without_waiting(self, send) -> None:
    """Runs `send` (no arguments) on a thread of its own, so the device goes on."""
    threading.Thread(target=send, daemon=True, name=f'ntkdd-push{self.worker_id}').start()

  def _await_alpha(self, spec) -> np.ndarray:
    """The overlapped step's alpha: the cache entry `spec` {'name', 'version', 'source'},
    fetched from its source (the group leader) unless held, waiting for it to arrive there."""
    if not (isinstance(spec, dict) and spec.get('name') == protocol.ALPHA_CACHE
            and isinstance(spec.get('version'), int) and isinstance(spec.get('source'), str)):
      raise RequestError(BAD_REQUEST, f'alpha_cache must be {{"name": '
                                      f'{protocol.ALPHA_CACHE!r}, "version": int, "source": '
                                      f'peer id}}.')
    name, version, source = spec['name'], spec['version'], spec['source']
    with self._lock:
      held = self._images.get(name)
    if held is None or held[0] != version:
      if source != str(self.worker_id):
        answer = protocol.decode(self.fetch_images(name, version, source))
        if not answer.get('ok'):
          raise RequestError(answer.get('error', EXCEPTION), str(answer.get('message')))
      held = (version, self._wait_held(name, version))
    return np.asarray(held[1], np.float64)

  def _sum_caches(self, request: dict) -> dict:
    caches = request.get('caches')
    total = None
    for (peer, name, _), part in zip(caches, self._fetch_caches(request, protocol.SUM_CACHES)):
      if total is not None and part.shape != total.shape:   # added in the order given
        raise RequestError(BAD_REQUEST, f'sum_caches: {name!r} of peer {peer} has shape '
                                        f'{part.shape}, the first {total.shape}.')
      total = part.copy() if total is None else total + part
    return {'grad': total}

  def _fetch_caches(self, request: dict, method: str) -> list:
    """The arrays of a sum_caches / gather_caches request's `caches` ([[peer id, name,
    version], ...]), fetched from those peers at once, in the order given; this worker's own
    waited for while announced (gather_caches announces them: they are on their way)."""
    caches = request.get('caches')
    if not (isinstance(caches, list) and caches and all(
        isinstance(c, list) and len(c) == 3 and isinstance(c[0], str) and isinstance(c[1], str)
        and isinstance(c[2], int) for c in caches)):
      raise RequestError(BAD_REQUEST, f'{method} needs `caches`: [[peer id, name, version], '
                                      '...], non-empty.')
    for peer, _, _ in caches:
      if peer != str(self.worker_id) and peer not in self._peers:
        raise RequestError(BAD_REQUEST, f'{method}: {peer!r} is not a peer of worker '
                                        f'{self.worker_id}.')

    def fetch(entry: list) -> np.ndarray:
      peer, name, version = entry
      if peer == str(self.worker_id):
        if method == protocol.GATHER_CACHES:   # on their way here: the request may come first
          self.announce([name], version)
        return self._wait_held(name, version)
      answer = protocol.decode(self._peers[peer].cached_images(name, version))
      if not answer.get('ok'):
        raise RequestError(answer.get('error', EXCEPTION), f'peer {peer}: {answer.get("message")}')
      return answer['images']

    return self._gather([lambda entry=entry: fetch(entry) for entry in caches])

  def _gather_caches(self, request: dict) -> dict:
    parts = self._fetch_caches(request, protocol.GATHER_CACHES)
    return {'values': np.concatenate([part.reshape(-1) for part in parts])}

  def _gather(self, calls: list) -> list:
    """The results of `calls` (no-argument functions), run at once on threads (fetches from
    several peers share this worker's link instead of queueing one after another)."""
    if len(calls) == 1:
      return [calls[0]()]
    with concurrent.futures.ThreadPoolExecutor(min(len(calls), GATHER_THREADS)) as pool:
      return list(pool.map(lambda call: call(), calls))

  def keep(self, name: str, version: int, array: np.ndarray) -> None:
    """Not an RPC: holds `array` as the cache entry (`name`, `version`) for peers to fetch
    (a group leader's summed gradient of the fused KIP step)."""
    with self._lock:
      self._images[name] = (int(version), array)
      self._cache_changed.notify_all()

  def _images_for(self, request: dict, side: str) -> np.ndarray:
    """The `side` ('rows' or 'cols') images of a request: inline, or a cached range."""
    images = self._images_unchecked(request, side)
    if len(images) > MAX_BLOCK_SIDE:
      raise RequestError(BAD_REQUEST, f'{len(images)} {side} in one block; the limit is '
                                      f'{MAX_BLOCK_SIDE}.')
    return images

  def _images_unchecked(self, request: dict, side: str) -> np.ndarray:
    inline = request.get(side)
    if isinstance(inline, np.ndarray):
      if inline.ndim not in (2, 4) or inline.dtype.kind not in 'biuf':
        raise RequestError(BAD_REQUEST, f'{side} must be a numeric NHWC or (N, D) array.')
      return inline.astype(self.dtype, copy=False)
    key = request.get(f'{side}_dataset')
    if key is not None:
      if not isinstance(key, str):
        raise RequestError(BAD_REQUEST, f'{side}_dataset must be a str.')
      return self._dataset_rows(key, request.get(f'{side}_indices'), side)
    name = request.get(f'{side}_cache')
    if name is None:
      raise RequestError(BAD_REQUEST, f'The request gives neither {side} nor {side}_cache.')
    if not isinstance(name, str):
      raise RequestError(BAD_REQUEST, f'{side}_cache must be a str.')
    version = request.get(f'{side}_version')
    with self._lock:
      held = self._images.get(name)
    if held is None or held[0] != version:
      have = 'nothing' if held is None else f'version {held[0]}'
      raise RequestError(STALE_CACHE, f'Cache {name!r} version {version} requested, but this '
                                      f'worker holds {have}.')
    images = held[1]
    start, stop = request.get(f'{side}_start'), request.get(f'{side}_stop')
    if not (isinstance(start, int) and isinstance(stop, int)):
      raise RequestError(BAD_REQUEST, f'{side}_start and {side}_stop must be ints.')
    if not 0 <= start < stop <= len(images):
      raise RequestError(BAD_REQUEST, f'{side} range [{start}, {stop}) is outside cache '
                                      f'{name!r} of {len(images)} images.')
    return images[start:stop]


  def _dataset_rows(self, key: str, indices, side: str) -> np.ndarray:
    split = self._datasets.get(key)
    if split is None:
      held = ', '.join(self._datasets) or 'none'
      why = f' (loading failed: {self.dataset_error})' if self.dataset_error else ''
      raise RequestError(MISSING_DATASET, f'Dataset {key!r} requested; this worker holds '
                                          f'{held}{why}.')
    if not isinstance(indices, np.ndarray) or indices.ndim != 1 or indices.dtype.kind not in 'iu':
      raise RequestError(BAD_REQUEST, f'{side}_indices must be a 1-d integer array.')
    if len(indices) and not (0 <= indices.min() and indices.max() < len(split)):
      raise RequestError(BAD_REQUEST, f'{side}_indices outside dataset {key!r} of '
                                      f'{len(split)} images.')
    return split[indices]


def _pad_size(request: dict, side: str, images: np.ndarray) -> int:
  pad = request.get(f'pad_{side}') or 0
  if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= MAX_BLOCK_SIDE:
    raise RequestError(BAD_REQUEST, f'pad_{side} must be an int in [0, {MAX_BLOCK_SIDE}], got '
                                    f'{pad!r}.')
  return max(len(images), pad)


def _same_source(request: dict) -> bool:
  """Whether rows and cols are the same cached range (a diagonal block of K(x, x))."""
  keys = ('cache', 'version', 'start', 'stop')
  return (request.get('rows_cache') is not None
          and all(request.get(f'rows_{k}') == request.get(f'cols_{k}') for k in keys))
