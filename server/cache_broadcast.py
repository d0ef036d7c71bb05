"""How per-call image caches reach the workers: sent, or fetched from peers (broadcast 'tree')."""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from ntkdd.server.kernel_tasks import _Published, _Task, _Worker, _WorkerFault
from ntkdd.workers import protocol


class CacheBroadcast:
  """DistributedKernels' cache publishing and delivery (a mixin: it uses the backend's
  `_published`, `_tree`, `_holders`, `_root_sends`, `_workers`, `_call` and `_add_stats`)."""


  def _publish(self, name: str, images: np.ndarray) -> _Published:
    """Makes `images` the current cache `name`, with a new version unless unchanged."""
    current = self._published.get(name)
    if current is not None and current.images.shape == images.shape and np.array_equal(
        current.images, images):
      return current    # e.g. the support images of a KIP step's kernel() and vjp()
    start = time.perf_counter()
    payload = protocol.encode({'images': images})
    published = _Published(int(self._version_fn()), protocol.decode(payload)['images'], payload)
    self._add_stats(seconds_serialising=time.perf_counter() - start)
    self._published[name] = published
    with self._tree:    # holders of the old version are of no use any more
      for table in (self._holders, self._root_sends):
        for key in [k for k in table if k[0] == name]:
          del table[key]
    return published

  def _ensure_caches(self, worker: _Worker, task: _Task) -> None:
    """Gets the images a block reads to the worker, unless it already holds them."""
    for name, version in task.call.caches.items():
      with worker.cache_lock:
        if worker.held.get(name) == version:
          continue
        published = self._published[name]
        if published.version != version:
          raise _WorkerFault(f'internal: cache {name!r} moved on to another call')
        if self.broadcast == 'tree' and worker.peer_id is not None:
          self._fetch_via_tree(worker, name, published)
        else:
          self._send_images(worker, name, published)
        worker.held[name] = version
        worker.cache_epoch += 1

  def _send_images(self, worker: _Worker, name: str, published: _Published) -> None:
    response = self._call(worker, 'set_images', name, published.version, published.payload)
    if not response.get('ok'):
      raise _WorkerFault(f"set_images {response.get('error')}: {response.get('message')}")
    self._add_stats(cache_sends=1)

  def _fetch_via_tree(self, worker: _Worker, name: str, published: _Published) -> None:
    """The worker fetches the cache from a peer holding it, or (none free) is sent it.

    Every worker becomes a source as soon as its fetch starts (its peers' fetches wait for
    its copy: cut-through), so copies multiply by `tree_fanout` per hop and the coordinator
    sends only a few of them. A source that cannot serve (lost the images, down) is dropped
    and another one tried.
    """
    key = (name, published.version)
    while True:
      source, depth = self._acquire_source(key, worker)
      if source is None:
        try:
          self._send_images(worker, name, published)
        finally:
          self._release_source(key, None)
        break
      # A source from now on (cut-through): a peer asking it waits until its copy is in.
      # It picked its own source among earlier holders, so sources never form a cycle.
      self._add_holder(key, worker, depth + 1)
      try:
        response = self._call(worker, 'fetch_images', name, published.version, source.peer_id)
      except _WorkerFault:
        self._drop_holder(key, worker)
        raise
      finally:
        self._release_source(key, source)
      if response.get('ok'):
        self._add_stats(tree_fetches=1)
        return
      logging.info('Worker %d could not fetch %r from worker %d: %s', worker.index, name,
                   source.index, response.get('message'))
      self._add_stats(tree_fetch_failures=1)
      self._drop_holder(key, worker)
      self._drop_holder(key, source)   # it lost them, or is down: another source next
    self._add_holder(key, worker, 1)

  def _add_holder(self, key: tuple, worker: _Worker, depth: int) -> None:
    with self._tree:
      if self._published[key[0]].version == key[1]:
        self._holders.setdefault(key, {}).setdefault(worker.index, [0, depth])
      self._tree.notify_all()

  def _drop_holder(self, key: tuple, worker: _Worker) -> None:
    with self._tree:
      self._holders.get(key, {}).pop(worker.index, None)

  def _acquire_source(self, key: tuple, worker: _Worker) -> tuple[Optional[_Worker], int]:
    """(a holder of `key` with a free fetch slot, its depth), waiting for one; (None, 0): the
    coordinator sends. The shallowest holder first, so the tree stays log_fanout deep."""
    with self._tree:
      while True:
        holders = self._holders.setdefault(key, {})
        free = [(depth, fetches, index) for index, (fetches, depth) in holders.items()
                if fetches < self.tree_fanout and index != worker.index
                and self._workers[index].alive and self._workers[index].peer_id is not None]
        if free:
          depth, _, index = min(free)
          holders[index][0] += 1
          return self._workers[index], depth
        if not self._root_sends.get(key, 0):   # one copy at a time over its own link
          self._root_sends[key] = self._root_sends.get(key, 0) + 1
          return None, 0
        if self._closed.is_set():
          raise _WorkerFault('the coordinator was closed')
        self._tree.wait(self.poll_s)

  def _release_source(self, key: tuple, source: Optional[_Worker]) -> None:
    with self._tree:
      if source is None:
        if key in self._root_sends:
          self._root_sends[key] -= 1
      elif source.index in self._holders.get(key, {}):
        self._holders[key][source.index][0] -= 1
      self._tree.notify_all()
