"""The distributed kernel service: wire format, workers, coordinator faults, KIP end to end, and
the coordinator program."""
import json
import os
import threading
import time

import numpy as np
import pytest

from ntkdd.common import architectures, prepared, sources
from ntkdd.launch.inprocess import LocalWorkerHandle, make_inprocess_backend
from ntkdd.server import backend, coordinator, distill, distributed_kernels, jobs, status
from ntkdd.server import run_dir as run_dir_lib
from ntkdd.workers import kernel_worker, protocol

FC = architectures.Architecture('fc', depth=1)
CONVNET = architectures.Architecture('convnet', depth=1)
FAST_FAULTS = dict(deadline_s=2.0, retry_backoff_s=0.05, grace_s=5.0, poll_s=0.02)


def _images(n, seed):
  return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _close(a, b, rtol=1e-5):
  scale = np.max(np.abs(b))
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _assert_kernels_equal(got, want):
  for name in ('ntk', 'nngp'):
    _close(got[name], want[name])


# -- Wire format. ------------------------------------------------------------------------------

def test_wire_round_trips_arrays_and_fields():
  message = {'f64': np.arange(12, dtype=np.float64).reshape(3, 4),
             'f32': np.linspace(-1, 1, 7, dtype=np.float32),
             'i64': np.array([[-5, 7]], dtype=np.int64), 'u8': np.arange(3, dtype=np.uint8),
             'zero_d': np.array(2.5), 'scalar': np.float32(1.5),
             'empty': np.zeros((0, 8, 8, 1), np.float32), 'bools': np.array([True, False]),
             'strided': np.arange(20.0).reshape(4, 5)[:, ::2],
             'n': 3, 'name': 'rows', 'nothing': None, 'nested': {'a': [1, 2.5, 'x']}}
  decoded = protocol.decode(protocol.encode(message))
  assert set(decoded) == set(message)
  for key, value in message.items():
    if isinstance(value, (np.ndarray, np.generic)):
      value = np.asarray(value)
      assert decoded[key].dtype == value.dtype and decoded[key].shape == value.shape, key
      np.testing.assert_array_equal(decoded[key], value)
    else:
      assert decoded[key] == value
  assert protocol.decode(protocol.encode({})) == {}


def test_wire_carries_megabyte_arrays_as_raw_bytes_and_decodes_without_a_copy():
  # What keeps the wire cheap (its speed is bench/distributed_step.py's business): the bytes are
  # the array's own plus a small header, and decoding makes a view on them, not a copy.
  images = np.random.default_rng(0).normal(size=(256, 32, 32, 3)).astype(np.float32)  # 3 MB
  data = protocol.encode({'images': images})
  assert images.nbytes <= len(data) < images.nbytes + 512
  decoded = protocol.decode(data)
  np.testing.assert_array_equal(decoded['images'], images)
  assert np.shares_memory(decoded['images'], np.frombuffer(data, np.uint8))
  assert not decoded['images'].flags.writeable


def test_wire_rejects_bad_bytes_clearly():
  data = protocol.encode({'x': np.arange(10.0), 'n': 1})
  for cut in (0, 3, 9, 20, len(data) - 1):
    with pytest.raises(protocol.WireError, match='Truncated'):
      protocol.decode(data[:cut])
  with pytest.raises(protocol.WireError, match='magic'):
    protocol.decode(b'PKL!' + data[4:])
  wrong_version = data[:4] + (protocol.VERSION + 1).to_bytes(2, 'little') + data[6:]
  with pytest.raises(protocol.WireError, match='version'):
    protocol.decode(wrong_version)
  with pytest.raises(protocol.WireError, match='Oversized'):
    protocol.decode(data + b'\0' * 8)
  with pytest.raises(protocol.WireError, match='pickle'):
    protocol.encode({'objects': np.array([{}, 1], dtype=object)})
  assert issubclass(protocol.WireError, ValueError)


# -- Worker. -----------------------------------------------------------------------------------

def test_worker_reports_stale_cache_and_rejects_numpy_arguments():
  worker = kernel_worker.KernelWorker(FC.to_dict(), worker_id=7)
  x = _images(4, 0)
  assert protocol.decode(worker.set_images('rows', 3, protocol.encode({'images': x})))['ok']
  request = {'rows_cache': 'rows', 'rows_version': 4, 'rows_start': 0, 'rows_stop': 2,
             'cols': x[:3]}
  answer = protocol.decode(worker.kernel_block(protocol.encode(request)))
  assert not answer['ok'] and answer['error'] == 'stale_cache' and 'version 3' in answer['message']
  request['rows_version'] = 3
  answer = protocol.decode(worker.kernel_block(protocol.encode(request)))
  assert answer['ok'] and answer['ntk'].shape == (2, 3)
  pong = protocol.decode(worker.ping())
  assert pong['worker_id'] == 7 and pong['blocks_done'] == 1 and pong['caches'] == {'rows': 3}
  with pytest.raises(TypeError, match='Courier'):
    LocalWorkerHandle(worker).kernel_block(x)
  garbage = protocol.decode(worker.kernel_block(b'not a message'))
  assert not garbage['ok'] and garbage['error'] == 'malformed_message'


# -- Coordinator against the in-process engine. --------------------------------------------------

# The convnet reference uses the blocks' tile shape to share their compilations (faster).
@pytest.mark.parametrize('arch,workers,reference_tile', [(FC, 1, None), (FC, 3, None),
                                                         (CONVNET, 3, 3)])
def test_distributed_equals_inprocess(arch, workers, reference_tile):
  x1, x2 = _images(7, 1), _images(5, 2)
  g_ntk = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
  g_nngp = np.random.default_rng(4).normal(size=(7, 5)).astype(np.float32)
  reference = backend.InProcessKernels(arch, tile=reference_tile)
  with make_inprocess_backend(arch, workers=workers, block=3) as distributed:
    symmetric = distributed.kernel(x1)
    _assert_kernels_equal(symmetric, reference.kernel(x1))
    _close(symmetric['ntk'], symmetric['ntk'].T)   # off-diagonal blocks are exact mirrors
    _assert_kernels_equal(distributed.kernel(x1, x2), reference.kernel(x1, x2))
    _close(distributed.vjp(x1, x2, g_ntk, g_nngp), reference.vjp(x1, x2, g_ntk, g_nngp))
    _close(distributed.vjp(x1, x2, None, g_nngp), reference.vjp(x1, x2, None, g_nngp))
    status = distributed.status()
    # 7 rows in blocks of 3: 6 upper-triangle blocks, 3 x 2 = 6 blocks, and 6 for each vjp.
    assert status['blocks_done'] == 24 and status['alive_workers'] == workers
    assert sum(w['blocks_done'] for w in status['workers']) == 24
    assert status['bytes_sent'] > 0 and status['bytes_received'] > 0
    assert distributed.pairs_per_second() > 0



def test_block_side_fits_each_calls_rows_when_not_given(tiny_npz):
  from ntkdd.server import block_plan
  assert block_plan.tile_side(10) == 10 and block_plan.tile_side(100) == 50
  assert block_plan.tile_side(500) == 63 and block_plan.tile_side(10, 64) == 64
  spec, data = _prepared_tiny(tiny_npz)
  support, both = _kip_columns(data)     # 5 support rows; columns: 5 support + 7 targets
  direct = backend.InProcessKernels(FC)
  want = direct.kernel(support, np.asarray(both))
  g = np.random.default_rng(0).normal(size=want['ntk'].shape)
  with make_inprocess_backend(FC, workers=2, block=None, dataset=spec.to_dict()) as fitted:
    _assert_kernels_equal(fitted.kernel(support, both), want)
    _close(fitted.vjp(support, both, g, None), direct.vjp(support, both, g, None))
    # Blocks of 5 x 5: the support span is one block, the 7 targets two (5 and 2 padded to 5);
    # the default 64 would have made one block per span, the support's padded to 12 columns.
    assert fitted.status()['blocks_done'] == 2 * 3

# -- Faults. -------------------------------------------------------------------------------------

# Longest a hung fake call waits for its release: far past every deadline and grace period
# here, so a coordinator that waits for hung calls fails the test instead of hanging it.
HANG_LIMIT_S = 120


class FlakyHandle(LocalWorkerHandle):
  """A local worker whose block calls number `fail_on` raise, or, given `release` (an Event),
  hang until it is set."""

  def __init__(self, worker, fail_on=(), release=None):
    super().__init__(worker)
    self.fail_on, self.release, self.block_calls = set(fail_on), release, 0
    self._lock = threading.Lock()

  def _invoke(self, method, *args):
    if method in ('kernel_block', 'vjp_block'):
      with self._lock:
        self.block_calls += 1
        call = self.block_calls
      if call in self.fail_on:
        if self.release is None:
          raise ConnectionError(f'boom on block call {call}')
        self.release.wait(HANG_LIMIT_S)
    return super()._invoke(method, *args)


class DeadHandle:
  """A worker that is gone: every call raises, or, given `release`, first hangs until it is set.
  `hung` counts the calls that hung, `returned` those of them that have returned."""

  def __init__(self, release=None):
    self.release, self.hung, self.returned = release, 0, 0
    self._lock = threading.Lock()

  def _fail(self, *args):
    if self.release is not None:
      with self._lock:
        self.hung += 1
      self.release.wait(HANG_LIMIT_S)
      with self._lock:
        self.returned += 1
    raise ConnectionError('connection refused')

  ping = set_images = kernel_block = vjp_block = _fail


def _worker(i=0):
  return kernel_worker.KernelWorker(FC.to_dict(), worker_id=i)


def test_a_worker_that_raises_is_retried_and_used_again():
  x1, x2 = _images(9, 5), _images(6, 6)
  flaky = FlakyHandle(_worker(), fail_on=(2,))
  with distributed_kernels.DistributedKernels([flaky], block=3, **FAST_FAULTS) as distributed:
    _assert_kernels_equal(distributed.kernel(x1, x2), backend.InProcessKernels(FC).kernel(x1, x2))
    status = distributed.status()
  (worker,) = status['workers']
  assert worker['failures'] == 1 and 'boom on block call 2' in worker['last_error']
  assert worker['last_error_time'] is not None and worker['alive']
  # One worker did all 3 x 2 blocks: one before its failure, the other five after recovering.
  assert worker['blocks_done'] == 6 and flaky.block_calls == 7
  assert status['blocks_requeued'] == 1


def test_faulty_workers_among_good_ones_give_correct_results():
  x1, x2 = _images(9, 7), _images(6, 8)
  g = np.random.default_rng(9).normal(size=(9, 6)).astype(np.float32)
  # The reference first, in the blocks' tile shape: the workers share its compilations, so no
  # compile of a good worker's block can miss the deadline.
  reference = backend.InProcessKernels(FC, tile=3)
  want, want_grad = reference.kernel(x1, x2), reference.vjp(x1, x2, g, g)
  release = threading.Event()   # worker 2's first block call hangs until the end of the test
  handles = [LocalWorkerHandle(_worker(0)), FlakyHandle(_worker(1), fail_on=(2,)),
             FlakyHandle(_worker(2), fail_on=(1,), release=release)]
  try:
    with distributed_kernels.DistributedKernels(handles, block=3, **FAST_FAULTS) as distributed:
      _assert_kernels_equal(distributed.kernel(x1, x2), want)
      _close(distributed.vjp(x1, x2, g, g), want_grad)
      errors = [w['last_error'] or '' for w in distributed.status()['workers']]
  finally:
    release.set()
  assert 'boom' in errors[1] and 'deadline' in errors[2] and errors[0] == ''


def test_all_workers_down_raises_without_waiting_for_hung_calls():
  for hang in (False, True):
    release = threading.Event() if hang else None
    handles = [DeadHandle(release), DeadHandle(release)]
    faults = dict(FAST_FAULTS, deadline_s=0.2, grace_s=0.5)
    distributed = distributed_kernels.DistributedKernels(handles, block=3, **faults)
    try:
      with pytest.raises(distributed_kernels.WorkersUnavailable, match='All 2 kernel workers'):
        distributed.kernel(_images(4, 0))
      assert not any(w['alive'] for w in distributed.status()['workers'])
      distributed.close()
      if hang:   # it raised and closed while every hung call was still under way
        assert [(h.hung > 0, h.returned) for h in handles] == [(True, 0)] * 2
    finally:
      if release is not None:
        release.set()


def test_a_stale_worker_cache_is_detected_and_resent():
  x1 = _images(5, 10)
  with make_inprocess_backend(FC, workers=1, block=3) as distributed:
    first = distributed.kernel(x1)
    sends = distributed.status()['cache_sends']
    # As if the worker restarted or another coordinator overwrote its 'rows' cache.
    worker = distributed._workers[0].handle.worker
    worker.set_images('rows', 1, protocol.encode({'images': np.ones_like(x1)}))
    second = distributed.kernel(x1)
    status = distributed.status()
  _assert_kernels_equal(second, first)
  assert status['stale_cache_resends'] >= 1 and status['cache_sends'] == sends + 1
  assert all(w['failures'] == 0 for w in status['workers'])


# -- Dataset rows as indices. ---------------------------------------------------------------------

def _prepared_tiny(tiny_npz):
  spec = prepared.DataSpec(dataset=tiny_npz, data_dir='.')
  return spec, prepared.prepare(spec)


def _kip_columns(data, support_n=5, targets=(0, 3, 7, 8, 20, 30, 31)):
  """[support; target rows] as a KIP step gives them to the backend."""
  support = data.x_train[:support_n] + 0.25   # moved support images, not dataset rows
  return support, sources.concat([support, data.rows('train', list(targets))])


def test_workers_holding_the_dataset_get_target_indices(tiny_npz):
  spec, data = _prepared_tiny(tiny_npz)
  support, both = _kip_columns(data)
  direct = backend.InProcessKernels(FC)
  want = direct.kernel(support, np.asarray(both))
  g = np.random.default_rng(0).normal(size=want['ntk'].shape)
  want_grad = direct.vjp(support, np.asarray(both), g, None)
  sent = {}
  for holds in (True, False):
    with make_inprocess_backend(FC, workers=2, block=3,
                                dataset=spec.to_dict() if holds else None) as distributed:
      _assert_kernels_equal(distributed.kernel(support, both), want)
      _close(distributed.vjp(support, both, g, None), want_grad)
      status = distributed.status()
    sent[holds] = status['bytes_sent']
    if holds:
      assert status['index_blocks'] > 0 and status['pixel_fallback_blocks'] == 0
      assert all(data.key('train') in w['datasets'] for w in status['workers'])
    else:
      assert status['index_blocks'] == 0 and status['pixel_fallback_blocks'] > 0
  assert sent[True] < sent[False]    # indices (8 bytes an image) instead of pixels


def test_a_worker_with_other_data_is_sent_pixels(tiny_npz, tmp_path):
  spec, data = _prepared_tiny(tiny_npz)
  support, both = _kip_columns(data)
  want = backend.InProcessKernels(FC).kernel(support, np.asarray(both))
  other = prepared.DataSpec(dataset=tiny_npz, data_dir='.', preprocess='none')   # other key
  missing = prepared.DataSpec(dataset=str(tmp_path / 'nope.npz'), data_dir='.')
  workers = [kernel_worker.KernelWorker(FC.to_dict(), worker_id=i, dataset=d.to_dict())
             for i, d in enumerate((spec, other, missing))]
  assert workers[2].dataset_error and 'nope.npz' in workers[2].dataset_error
  with distributed_kernels.DistributedKernels([LocalWorkerHandle(w) for w in workers], block=2,
                                              **FAST_FAULTS) as distributed:
    _assert_kernels_equal(distributed.kernel(support, both), want)
    status = distributed.status()
  assert status['index_blocks'] > 0 and status['pixel_fallback_blocks'] > 0
  assert all(w['failures'] == 0 for w in status['workers'])
  assert 'nope.npz' in status['workers'][2]['dataset_error']


def test_a_worker_that_lost_the_dataset_is_sent_pixels_without_a_fault(tiny_npz):
  spec, data = _prepared_tiny(tiny_npz)
  support, both = _kip_columns(data)
  want = backend.InProcessKernels(FC).kernel(support, np.asarray(both))
  worker = kernel_worker.KernelWorker(FC.to_dict(), dataset=spec.to_dict())
  with distributed_kernels.DistributedKernels([LocalWorkerHandle(worker)], block=3,
                                              **FAST_FAULTS) as distributed:
    distributed.kernel(support, both)
    worker._datasets.clear()      # as if it restarted without its data dir
    _assert_kernels_equal(distributed.kernel(support, both), want)
    status = distributed.status()
  assert status['missing_dataset_resends'] >= 1 and status['pixel_fallback_blocks'] > 0
  assert status['workers'][0]['failures'] == 0


def test_worker_rejects_bad_indices(tiny_npz):
  spec, data = _prepared_tiny(tiny_npz)
  worker = kernel_worker.KernelWorker(FC.to_dict(), dataset=spec.to_dict())
  request = {'rows': data.x_train[:2], 'cols_dataset': data.key('train'),
             'cols_indices': np.array([0, len(data.x_train)])}
  answer = protocol.decode(worker.kernel_block(protocol.encode(request)))
  assert answer['error'] == 'bad_request' and 'outside' in answer['message']
  request['cols_dataset'] = 'train:0000'
  answer = protocol.decode(worker.kernel_block(protocol.encode(request)))
  assert answer['error'] == 'missing_dataset'


# -- KIP end to end. -----------------------------------------------------------------------------

def test_kip_with_distributed_backend_matches_inprocess(tiny_npz, tmp_path):
  cfg = distill.DistillConfig(algorithm='kip', dataset=tiny_npz, data_dir='.', ipc=2, steps=4,
                              arch='fc', depth=1, target_batch=12, eval_every=2,
                              checkpoint_every=2, learning_rate=0.05, seed=3,
                              dtype='float64')
  backends = []

  def distributed_factory(arch):
    backends.append(make_inprocess_backend(arch, workers=2, block=4, dtype='float64',
                                           dataset=cfg.data_spec().to_dict()))
    return backends[-1]

  # The KRR solve and Adam's first steps (about sign(gradient)) amplify rounding differences
  # between tile shapes (the coordinator's column blocks split at the support/target boundary)
  # by ~1e3: in float64 that is still ~1e-12, so the strict comparison holds in float64.
  runs = {'distributed': distributed_factory,
          'tile4': lambda arch: backend.InProcessKernels(arch, tile=4, dtype='float64'),
          'default': lambda arch: backend.InProcessKernels(arch, dtype='float64')}
  supports = {}
  for run, factory in runs.items():
    distill.distill(cfg, str(tmp_path / run), factory, progress=False)
    with np.load(tmp_path / run / 'support.npz') as f:
      supports[run] = {k: f[k] for k in f.files}
  distributed = supports['distributed']
  for key, want in supports['tile4'].items():
    if want.dtype.kind == 'f':
      np.testing.assert_allclose(distributed[key], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    else:
      np.testing.assert_array_equal(distributed[key], want)
  default = supports['default']['images']
  assert np.abs(distributed['images'] - default).max() < 1e-3 * np.abs(default).max()
  status = backends[0].status()
  assert status['blocks_done'] > 0 and all(w['blocks_done'] > 0 for w in status['workers'])
  # Target batches and test images went as indices into the workers' own copy of the data.
  assert status['index_blocks'] > 0 and status['pixel_fallback_blocks'] == 0
  backends[0].close()


# -- The coordinator program (server/coordinator.py), launcher-neutral. -------------------------

def _local_handles(cfg, workers=2):
  arch = cfg.architecture().to_dict()
  return [LocalWorkerHandle(kernel_worker.KernelWorker(arch, cfg.dtype, worker_id=i))
          for i in range(workers)]


def test_coordinator_program_runs_over_any_handles(tiny_npz, tmp_path):
  """The program Launchpad and Ray run, here over in-process handles: the same run as the
  in-process path, its result, worker pids and status files, and the stop hook called once."""
  from run_helpers import BLOCK, assert_same_support, run_inprocess, tiny_cfg
  cfg = tiny_cfg(tiny_npz)
  run_inprocess(cfg, tmp_path / 'reference')
  run_dir = coordinator.open_run_dir(tmp_path / 'run', resume=False)
  stops = []
  program = coordinator.Coordinator(jobs.to_dict(cfg), str(run_dir), False, _local_handles(cfg),
                                    block=BLOCK, stop_hook=lambda: stops.append(True))
  assert json.loads(program.ping())['role'] == 'coordinator'
  assert status.decode(program.status())['phase'] == 'starting'
  program.run()
  assert stops == [True]
  result = coordinator.read_result(run_dir)
  assert result['ok'] and result['backend']['blocks_done'] > 0, result
  assert coordinator.summary_of(result)['steps'] == 4
  assert_same_support(tmp_path / 'reference', run_dir)
  pids = json.loads((run_dir / run_dir_lib.WORKER_PIDS).read_text())
  assert pids['workers'] == {'0': os.getpid(), '1': os.getpid()}
  snap = status.decode(program.status())
  assert snap['phase'] == 'done' and snap['step'] == 4 and snap['worker_pids'] == pids['workers']
  with pytest.raises(RuntimeError, match='once'):
    program.run()
  # A finished run is not started over by mistake; --resume may continue it.
  with pytest.raises(ValueError, match='already holds a run'):
    coordinator.open_run_dir(run_dir, resume=False)
  assert coordinator.open_run_dir(run_dir, resume=True) == run_dir
  # A stale result is removed before a restart.
  assert not (run_dir / run_dir_lib.COORDINATOR_RESULT).exists()


class _NeverReady(LocalWorkerHandle):
  """A worker that never comes up: wait_ready times out, as a launcher's handle would."""

  def wait_ready(self, timeout_s):
    time.sleep(min(timeout_s, 0.05))
    raise TimeoutError('still importing JAX')


def test_coordinator_records_workers_that_never_start(tiny_npz, tmp_path):
  from run_helpers import tiny_cfg
  cfg = tiny_cfg(tiny_npz)
  good, late = _local_handles(cfg)
  late = _NeverReady(late.worker)
  stops = []
  program = coordinator.Coordinator(jobs.to_dict(cfg), str(tmp_path / 'run'), False,
                                    [good, late], startup_timeout_s=0.2,
                                    stop_hook=lambda: stops.append(True))
  program.run()   # every outcome is recorded, nothing raised
  assert stops == [True]
  result = coordinator.read_result(tmp_path / 'run')
  assert not result['ok'] and 'Kernel worker 1 (worker 1) did not answer ping' in result['error']
  assert 'still importing JAX' in result['error']
  with pytest.raises(coordinator.CoordinatorFailed, match='did not answer ping'):
    coordinator.summary_of(result)
  assert status.decode(program.status())['phase'] == 'failed'
  with pytest.raises(distill.Interrupted, match='stopped'):
    coordinator.summary_of({'ok': False, 'interrupted': True, 'error': 'stopped'})


def test_wait_for_workers_names_the_worker_and_why():
  worker = kernel_worker.KernelWorker(FC.to_dict(), worker_id=3)
  answers = coordinator.wait_for_workers([LocalWorkerHandle(worker)], 1.0)
  assert answers[0]['worker_id'] == 3 and answers[0]['pid'] == os.getpid()

  class Broken(LocalWorkerHandle):
    def wait_ready(self, timeout_s):
      raise ConnectionError('actor died in __init__')

  with pytest.raises(coordinator.CoordinatorFailed,
                     match=r'Kernel worker 1 \(worker 3\) failed to start: ConnectionError'):
    coordinator.wait_for_workers([LocalWorkerHandle(worker), Broken(worker)], 1.0)
