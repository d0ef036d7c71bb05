"""Simulated GPU kernel workers: the real worker protocol, with modelled device time and links.

A `SimulatedWorker` is a `KernelWorker` (same request parsing, caches, dataset rows, error
codes and wire bytes in and out) whose blocks, instead of running the kernel engine, hold its
one simulated device for the block's modelled GPU time (padded pairs x seconds per pair,
forward or vjp) and answer arrays of the right shape whose content is a cheap deterministic
surrogate kernel (`surrogate_kernel`, `surrogate_vjp`: an RBF of the first few features), so
a caller can check every block landed in the right place. With `compute='real'` the blocks
run the real engine instead (small problems, for exact comparisons).

A `Fleet` holds the workers and the network between them: every worker has its own link in
each direction, and the coordinator one link in each direction shared by all its transfers
(a FIFO: a transfer waits for the ones reserved before it, then takes bytes / bandwidth). A
message over a path takes the latest finish over the links it crosses plus half a round trip.
The coordinator talks to the workers through `Fleet.handles` (bytes, ints and strs only, as
Courier); workers fetch caches from each other through peer handles that model their links.
A call books its request's bytes, the device and its answer's bytes in (scaled) virtual time,
computes its answer at once, and sleeps once until the answer would arrive.

All modelled times are multiplied by `time_scale` (k) before sleeping, so a step of a 256-GPU
fleet can be stretched to seconds here; divide measured wall times by k for GPU time. What is
not scaled is the CPU the coordinator (and this simulation) really spends: `Fleet.sim_cpu_s`
counts the CPU seconds spent in simulated workers and links (thread CPU time, sleeps
excluded), so the process CPU minus it is the coordinator's own; `caller_sim_cpu_s` is the
part spent on the coordinator's slot threads (`ntkdd-worker*`: the handles' calls), to
subtract from theirs.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import numpy as np

from ntkdd.common import architectures
from ntkdd.launch.inprocess import LocalWorkerHandle
from ntkdd.workers import kernel_worker

# GPU guesses (BENCHMARKS.md, "Scale"): displacement-band kernels, 32x32x3 ConvNet depth 3,
# the FLOP model's 101 MFLOP a forward pair at ~15 TFLOP/s sustained.
GPU_SECONDS_PER_FORWARD_PAIR = 6.6e-6
GPU_SECONDS_PER_VJP_PAIR = 1.8e-5
COORDINATOR_BANDWIDTH = 1.25e9    # bytes/s: a 10 Gbit/s coordinator NIC (the model's default)
WORKER_BANDWIDTH = 1.25e10        # bytes/s: a 100 Gbit/s GPU-server NIC
ROUND_TRIP_S = 5e-4               # seconds per RPC round trip (the model's default)
SURROGATE_FEATURES = 16           # features of an image the surrogate kernel reads


@dataclasses.dataclass(frozen=True)
class SimParams:
  """The modelled fleet: per-pair device seconds, links, time scale, what blocks compute."""
  t_fwd: float = GPU_SECONDS_PER_FORWARD_PAIR
  t_vjp: float = GPU_SECONDS_PER_VJP_PAIR
  coordinator_bandwidth: float = COORDINATOR_BANDWIDTH
  worker_bandwidth: float = WORKER_BANDWIDTH
  round_trip_s: float = ROUND_TRIP_S
  time_scale: float = 1.0
  compute: str = 'sleep'          # 'sleep' (modelled time, surrogate content) or 'real'

  def __post_init__(self):
    if self.compute not in ('sleep', 'real'):
      raise ValueError(f"SimParams.compute must be 'sleep' or 'real', got {self.compute!r}.")
    if min(self.coordinator_bandwidth, self.worker_bandwidth, self.time_scale) <= 0:
      raise ValueError('SimParams needs positive bandwidths and time_scale.')


# -- The surrogate kernel (what simulated blocks contain). ---------------------------------------

def _features(x: np.ndarray) -> np.ndarray:
  """The first SURROGATE_FEATURES features of each row, in float64: the products below then
  round the same whatever the block's shape (float32 BLAS picks its kernel by shape, and on
  some CPUs rounds a block's entries differently from the same entries in a larger block),
  so that a pair's entry does not depend on the plan that computed it."""
  flat = np.asarray(x).reshape(len(x), -1)
  return flat[:, :SURROGATE_FEATURES].astype(np.float64)


def surrogate_kernel(x1: np.ndarray, x2: np.ndarray) -> dict:
  """{'ntk', 'nngp'}: exp(-|a - b|^2 / d) of the first d features, and half of it."""
  a, b = _features(x1), _features(x2)
  d2 = (np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2 * a @ b.T)
  ntk = np.exp(-np.maximum(d2, 0) / a.shape[1]).astype(np.asarray(x1).dtype)
  return {'ntk': ntk, 'nngp': 0.5 * ntk}


def surrogate_vjp(x1: np.ndarray, x2: np.ndarray, g_ntk: Optional[np.ndarray] = None,
                  g_nngp: Optional[np.ndarray] = None) -> np.ndarray:
  """d/dx1 of <g_ntk, NTK> + <g_nngp, NNGP> for the surrogate kernel."""
  x1 = np.asarray(x1)
  k = surrogate_kernel(x1, x2)['ntk']
  weight = np.zeros_like(k)
  if g_ntk is not None:
    weight += g_ntk * k
  if g_nngp is not None:
    weight += 0.5 * g_nngp * k
  a, b = _features(x1), _features(x2)
  grad = np.zeros((len(x1), x1[0].size), x1.dtype)
  weight = weight.astype(np.float64)
  grad[:, :a.shape[1]] = (-2.0 / a.shape[1]) * (weight.sum(1)[:, None] * a - weight @ b)
  return grad.reshape(x1.shape)


class _FeatureCache:
  """Surrogate features of each dataset array, computed once for all simulated workers."""

  def __init__(self):
    self._lock, self._features = threading.Lock(), {}

  def of(self, images: np.ndarray) -> np.ndarray:
    with self._lock:
      key = id(images)
      if key not in self._features:
        self._features[key] = (images, np.ascontiguousarray(_features(images)))
      return self._features[key][1]


_SHARED_FEATURES = _FeatureCache()


# -- Links. ----------------------------------------------------------------------------------------

class Link:
  """One direction of a network link: transfers take bytes / bandwidth, one at a time.

  Calls book their transfers ahead (an answer is booked when its block is booked on the
  device), so a booking takes the earliest free gap at or after its start, not the end of
  the queue: a transfer booked late for an early time does not wait behind one booked early
  for a late time.
  """

  def __init__(self, bandwidth: float, time_scale: float):
    self.bandwidth, self.time_scale = float(bandwidth), float(time_scale)
    self._busy: list[tuple[float, float]] = []    # booked (start, end), sorted by start
    self._lock = threading.Lock()
    self.bytes = 0

  def reserve(self, nbytes: int, not_before: float) -> float:
    """Books `nbytes` in the first gap from `not_before`; the monotonic time it finishes."""
    duration = self.time_scale * nbytes / self.bandwidth
    with self._lock:
      now = time.monotonic()
      self._busy = [b for b in self._busy if b[1] > now]
      start, position = not_before, len(self._busy)
      for i, (busy_start, busy_end) in enumerate(self._busy):
        if busy_end <= start:
          continue
        if busy_start >= start + duration:
          position = i
          break
        start = busy_end
      self._busy.insert(position, (start, start + duration))
      self.bytes += nbytes
      return start + duration


# -- Workers and their handles. --------------------------------------------------------------------

class SimulatedWorker(kernel_worker.KernelWorker):
  """A KernelWorker whose blocks take modelled device time and return surrogate content."""

  def __init__(self, arch: dict, params: SimParams, worker_id: int = 0, dtype: str = 'float32',
               datasets: Optional[dict] = None, tile: Optional[int] = None):
    super().__init__(arch, dtype, tile, worker_id=worker_id)
    self.params = params
    for key, images in (datasets or {}).items():   # shared arrays: 256 workers, one copy
      self._datasets[key] = images
    # Simulated blocks read only the surrogate's features of the dataset rows: gathering
    # whole images per block would cost this CPU what a GPU's gather does not.
    if params.compute == 'sleep':
      self._datasets = {key: _SHARED_FEATURES.of(images) for key, images in
                        self._datasets.items()}
    self.link_in = Link(params.worker_bandwidth, params.time_scale)
    self.link_out = Link(params.worker_bandwidth, params.time_scale)
    self._device = threading.Lock()     # one simulated GPU: blocks run one at a time
    self._device_free_at = 0.0          # monotonic time its booked blocks end
    self.device_seconds = 0.0           # modelled (unscaled) seconds the device was busy
    self.state = 'up'                   # 'up', 'dead' (calls fail) or 'hung' (calls hang)
    self.hang_s = 0.0
    self.clock = _CallClock()           # per calling thread: when its request arrived, ...
    self.cache_ready_at: dict = {}      # cache name -> (version, virtual time it arrived)
    self.group_not_before = 0.0         # when the group requests it leads arrived (the first)
    self._group_lock = threading.Lock()
    self._group_requests = 0            # group requests it leads now (a head and its tail)

  def _occupy(self, seconds: float) -> None:
    """Books the device for `seconds` (modelled) after the request arrived and the blocks
    booked before it; the caller's handle sleeps until the answer is back."""
    clock = self.clock
    with self._device:
      start = max(clock.arrived, self._device_free_at)
      self._device_free_at = start + self.params.time_scale * seconds
      self.device_seconds += seconds
      clock.ready = self._device_free_at

  def _padded_pairs(self, request: dict, rows: np.ndarray, cols: np.ndarray) -> int:
    return (kernel_worker._pad_size(request, 'rows', rows)
            * kernel_worker._pad_size(request, 'cols', cols))

  def _kernel_block(self, request: dict) -> dict:
    if self.params.compute == 'real':
      return super()._kernel_block(request)
    rows, cols = self._images_for(request, 'rows'), self._images_for(request, 'cols')
    self._occupy(self._padded_pairs(request, rows, cols) * self.params.t_fwd)
    return surrogate_kernel(rows, cols)

  def _vjp_block(self, request: dict) -> dict:
    if self.params.compute == 'real':
      return super()._vjp_block(request)
    rows, cols = self._images_for(request, 'rows'), self._images_for(request, 'cols')
    shape = (len(rows), len(cols))
    for name in ('g_ntk', 'g_nngp'):
      g = request.get(name)
      if g is not None and g.shape != shape:
        raise kernel_worker.RequestError(kernel_worker.BAD_REQUEST,
                                         f'{name} has shape {g.shape}, expected {shape}.')
    self._occupy(self._padded_pairs(request, rows, cols) * self.params.t_vjp)
    return {'grad': surrogate_vjp(rows, cols, request.get('g_ntk'), request.get('g_nngp'))}

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    """As KernelWorker's, and notes when (virtual time) the images were all here."""
    answer = super().set_images(name, version, payload)
    self.cache_ready_at[name] = (int(version), self.clock.ready)
    return answer

  def keep(self, name: str, version: int, array: np.ndarray) -> None:
    """As KernelWorker's, and notes when (virtual time) the array was ready."""
    super().keep(name, version, array)
    self.cache_ready_at[name] = (int(version), self.clock.ready)

  def _wait_held(self, name: str, version: int) -> np.ndarray:
    """As KernelWorker's; this call is ready no earlier than the entry arrived."""
    held = super()._wait_held(name, version)
    held_version, arrived = self.cache_ready_at.get(name, (None, 0.0))
    if held_version == version:
      self.clock.ready = max(self.clock.ready, arrived)
    return held

  def _without_waiting(self, send) -> None:
    """On this thread, so the send books its transfer from when the array was computed
    (this thread's virtual time); the device goes on meanwhile (the peer handle's
    set_images does not sleep)."""
    send()

  def _await_alpha(self, spec) -> np.ndarray:
    """As KernelWorker's; the blocks booked after it start when alpha is here."""
    alpha = super()._await_alpha(spec)
    self.clock.arrived = max(self.clock.arrived, self.clock.ready)
    return alpha

  def group_blocks(self, request: bytes) -> bytes:
    """As KernelWorker's: its calls to the members start when the request has arrived, and
    its answer leaves when the last member's answer is in."""
    with self._group_lock:   # a tail arriving beside its head: the head's time stands
      if not self._group_requests:
        self.group_not_before = self.clock.arrived
      self._group_requests += 1
    try:
      answer = super().group_blocks(request)
    finally:
      with self._group_lock:
        self._group_requests -= 1
    self.clock.ready = max(self.clock.ready, time.monotonic())
    return answer

  def _gather(self, calls: list) -> list:
    """As KernelWorker's, each thread starting from this call's virtual time (its peers'
    transfers book from when the request arrived); the answer is ready when all are in."""
    arrived, ready = self.clock.arrived, self.clock.ready
    readies = []

    def timed(call):
      def run():
        self.clock.arrived, self.clock.ready = arrived, ready
        try:
          return call()
        finally:
          readies.append(self.clock.ready)
      return run

    results = super()._gather([timed(call) for call in calls])
    self.clock.ready = max([self.clock.ready] + readies)
    return results

  def restart(self) -> None:
    """As a restarted process: up again, its caches gone."""
    with self._lock:
      self._images.clear()
    self.state = 'up'


class _CallClock(threading.local):
  """Virtual times of the call a thread is making: its request's arrival and when the worker
  is ready to answer (later, if it booked its device or fetched from a peer)."""
  arrived = 0.0
  ready = 0.0


class SimulatedHandle(LocalWorkerHandle):
  """The coordinator's `protocol.WorkerHandle` of a simulated worker (a `LocalWorkerHandle`:
  Courier's rules), plus the network model."""

  def __init__(self, fleet: 'Fleet', worker: SimulatedWorker):
    super().__init__(worker)
    self.fleet = fleet

  def _invoke(self, method: str, *args) -> bytes:
    """Books the request's bytes, the device and the answer's bytes in virtual time, answers
    at once, then sleeps once until the answer would be back (one wake-up per call, so the
    machine's scheduling latency distorts the model little)."""
    start_cpu = time.thread_time()
    try:
      worker, fleet, clock = self.worker, self.fleet, self.worker.clock
      fleet.check_up(worker)
      sent = 64 + sum(len(a) for a in args if isinstance(a, bytes))
      clock.arrived = clock.ready = fleet.book(sent, [fleet.coordinator_out, worker.link_in],
                                               time.monotonic())
      answer = super()._invoke(method, *args)
      done = fleet.book(len(answer), [worker.link_out, fleet.coordinator_in], clock.ready)
    finally:
      # (The coordinator-CPU figure reads its slot threads: what they spent here is ours.)
      fleet.add_sim_cpu(time.thread_time() - start_cpu, on_caller=threading.current_thread(
          ).name.startswith('ntkdd-worker'))
    if fleet.trace is not None:
      fleet.trace.append((worker.worker_id, method, clock.arrived, clock.ready, done))
    time.sleep(max(0.0, done - time.monotonic()))
    fleet.check_up(worker)       # died while it computed: the answer is lost
    return answer


class _PeerHandle:
  """How worker `dest` reaches worker `source`: their own links, not the coordinator's
  (none when `source` is `dest`: a group leader computing its own blocks)."""

  def __init__(self, fleet: 'Fleet', source: SimulatedWorker, dest: SimulatedWorker):
    self.fleet, self.source, self.dest = fleet, source, dest

  def _call(self, method: str, *args) -> bytes:
    """A group leader's (`dest`) call to its member `source`, as SimulatedHandle's over
    their links: books the request, the member's device and the answer, then sleeps."""
    fleet, source, dest = self.fleet, self.source, self.dest
    fleet.check_up(source)
    not_before = max(time.monotonic(), dest.group_not_before)
    clock = source.clock
    if source is dest:
      arrived = not_before
    else:
      sent = 64 + sum(len(a) for a in args if isinstance(a, bytes))
      arrived = fleet.book(sent, [dest.link_out, source.link_in], not_before)
    clock.arrived = clock.ready = arrived
    answer = getattr(source, method)(*args)
    done = (clock.ready if source is dest else
            fleet.book(len(answer), [source.link_out, dest.link_in], clock.ready))
    time.sleep(max(0.0, done - time.monotonic()))
    fleet.check_up(source)
    return answer

  def kernel_block(self, request: bytes) -> bytes:
    return self._call('kernel_block', request)

  def vjp_block(self, request: bytes) -> bytes:
    return self._call('vjp_block', request)

  def kip_block(self, request: bytes) -> bytes:
    return self._call('kip_block', request)

  def fetch_images(self, name: str, version: int, peer: str) -> bytes:
    return self._call('fetch_images', name, version, peer)

  def set_images(self, name: str, version: int, payload: bytes) -> bytes:
    """A one-way send (the overlapped step's K_ss blocks to their leader): booked on both
    workers' links from when the sender's call is ready; no sleep, the sender goes on."""
    self.fleet.check_up(self.source)
    arrived = self.fleet.book(64 + len(payload), [self.dest.link_out, self.source.link_in],
                              self.dest.clock.ready)
    clock = self.source.clock   # this thread's view of the receiver
    clock.arrived = clock.ready = arrived
    return self.source.set_images(name, version, payload)

  def cached_images(self, name: str, version: int) -> bytes:
    """Books the fetch on both workers' links, after the fetching request arrived."""
    self.fleet.check_up(self.source)
    clock = self.dest.clock
    asked = self.fleet.book(64, [self.dest.link_out, self.source.link_in], clock.ready)
    answer = self.source.cached_images(name, version)   # waits if the source is fetching it
    held_version, arrived = self.source.cache_ready_at.get(name, (None, 0.0))
    start = max(asked, arrived) if held_version == int(version) else asked
    clock.ready = self.fleet.book(len(answer), [self.source.link_out, self.dest.link_in], start)
    return answer


class Fleet:
  """`workers` simulated workers, their links and the coordinator's; `handles` for it."""

  def __init__(self, workers: int, params: SimParams = SimParams(), arch: Optional[dict] = None,
               dtype: str = 'float32', datasets: Optional[dict] = None,
               tile: Optional[int] = None, peers: bool = True):
    """Args:
      workers: how many simulated workers.
      params: their device and network model.
      arch: the architecture dict (`compute='real'` computes it; else only reported by ping).
      datasets: {content key: images}, held (shared, not copied) by every worker.
      peers: wire the workers to each other, so the coordinator's broadcast='tree' works.
    """
    arch = arch or architectures.Architecture('convnet', depth=3).to_dict()
    self.params = params
    self.coordinator_out = Link(params.coordinator_bandwidth, params.time_scale)
    self.coordinator_in = Link(params.coordinator_bandwidth, params.time_scale)
    self.workers = [SimulatedWorker(arch, params, i, dtype, datasets, tile)
                    for i in range(workers)]
    self.handles = [SimulatedHandle(self, w) for w in self.workers]
    if peers:   # each worker's own handle among them: it leads group requests over them
      for dest in self.workers:
        dest.connect_peers({source.worker_id: _PeerHandle(self, source, dest)
                            for source in self.workers})
    for worker in self.workers:   # group leaders' lane threads are workers' CPU, not ours
      worker.thread_cpu_hook = self.add_sim_cpu
    self._cpu_lock = threading.Lock()
    self.sim_cpu_s = 0.0
    self.caller_sim_cpu_s = 0.0     # the part spent on the coordinator's calling threads
    self.trace: Optional[list] = None   # a list: (worker, method, arrived, ready, done) per call

  def book(self, nbytes: int, links: list, not_before: float) -> float:
    """When `nbytes` sent at `not_before` have crossed `links` (booked on each, FIFO) and
    half a round trip has passed (monotonic time, scaled)."""
    end = max([not_before] + [link.reserve(nbytes, not_before) for link in links])
    return end + self.params.time_scale * self.params.round_trip_s / 2

  def check_up(self, worker: SimulatedWorker) -> None:
    """Raises as a dead connection would; a hung worker first hangs `hang_s` (real) seconds."""
    if worker.state == 'hung':
      time.sleep(worker.hang_s)
      raise ConnectionError(f'simulated worker {worker.worker_id} hung')
    if worker.state == 'dead':
      raise ConnectionError(f'simulated worker {worker.worker_id}: connection refused')

  def kill(self, index: int) -> None:
    self.workers[index].state = 'dead'

  def hang(self, index: int, seconds: float) -> None:
    self.workers[index].hang_s = float(seconds)
    self.workers[index].state = 'hung'

  def restart(self, index: int) -> None:
    self.workers[index].restart()

  def add_sim_cpu(self, seconds: float, on_caller: bool = False) -> None:
    with self._cpu_lock:
      self.sim_cpu_s += seconds
      if on_caller:
        self.caller_sim_cpu_s += seconds

  def device_seconds(self) -> float:
    """Modelled (unscaled) device-busy seconds summed over the workers."""
    return sum(w.device_seconds for w in self.workers)
