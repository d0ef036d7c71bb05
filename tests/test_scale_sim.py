"""The coordinator against simulated fleets: block plans, tree broadcast, exactness, faults."""
import functools
import itertools
import threading
import time

import numpy as np
import pytest

from ntkdd.common import architectures, kip, sources
from ntkdd.launch.inprocess import LocalWorkerHandle
from ntkdd.server import backend, block_plan, distributed_kernels
from ntkdd.workers import group_leader, kernel_worker, protocol
from ntkdd.workers import simulated_worker as sim

FC = architectures.Architecture('fc', depth=1)
FAST = dict(deadline_s=5.0, retry_backoff_s=0.05, max_backoff_s=0.2, grace_s=10.0, poll_s=0.02)
QUICK = sim.SimParams(time_scale=1e-3)          # modelled times x 1e-3: a step in milliseconds


def _images(n, seed, shape=(8, 8, 1)):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def _kip_problem(seed=0, n_s=6, n_t=20, n_train=60, classes=3, dtype=np.float32):
  rng = np.random.default_rng(seed)
  train = rng.normal(size=(n_train, 8, 8, 1)).astype(dtype)
  key = 'train:' + sources.fingerprint(train)
  rows = rng.choice(n_train, n_t, replace=False)
  support = rng.normal(size=(n_s, 8, 8, 1)).astype(dtype)
  ids = rows % classes
  eye = np.eye(classes, dtype=dtype)
  args = (support, eye[np.arange(n_s) % classes] - 1 / classes,
          sources.DatasetRows(train[rows], key, rows), eye[ids] - 1 / classes, ids)
  return train, key, args


# -- Block plans. --------------------------------------------------------------------------------

@pytest.mark.parametrize('n_rows,spans,workers,symmetric', [
    (7, [(0, 7), (7, 30)], 16, False), (100, [(0, 100), (100, 5100)], 256, False),
    (13, [(0, 13)], 3, True), (40, [(0, 40)], 64, True), (5, [(0, 2), (2, 2), (2, 9)], 1, False)])
def test_balanced_plan_covers_every_pair_once_and_ends_small(n_rows, spans, workers, symmetric):
  blocks = block_plan.balanced_blocks(n_rows, spans, workers, symmetric)
  n_cols = spans[-1][1]
  covered = np.zeros((n_rows, n_cols), int)
  for (r0, r1), (c0, c1), span in blocks:
    assert spans[span][0] <= c0 < c1 <= spans[span][1] and 0 <= r0 < r1 <= n_rows
    covered[r0:r1, c0:c1] += 1
    if symmetric:
      assert c0 >= r1 or (r0, r1) == (c0, c1)   # above the diagonal, or a diagonal square
  want = np.triu(np.ones((n_rows, n_cols), int)) if symmetric else np.ones_like(covered)
  if symmetric:   # diagonal squares cover a little below the diagonal too
    assert np.all(covered[want == 1] == 1) and covered.max() == 1
  else:
    np.testing.assert_array_equal(covered, want)
  pairs = [(r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1), _ in blocks]
  assert pairs == sorted(pairs, reverse=True)        # the small blocks go last
  assert block_plan.balanced_blocks(n_rows, spans, workers, symmetric) == blocks  # deterministic


@pytest.mark.parametrize('n_rows,workers,tail_halvings', [(7, 1, 0), (37, 1, 0), (100, 2, 0),
                                                           (500, 1, 2)])
def test_symmetric_plan_tails_share_the_pairs_its_squares_leave(n_rows, workers, tail_halvings):
  """A symmetric plan's diagonal squares hold more pairs than the triangle: its tail is sized
  from the pairs really left (it divided by zero, or cut needless slivers, when sized from the
  triangle's count)."""
  blocks = block_plan.balanced_blocks(n_rows, [(0, n_rows)], workers, True,
                                      tail_halvings=tail_halvings)
  covered = np.zeros((n_rows, n_rows), int)
  for (r0, r1), (c0, c1), _ in blocks:
    covered[r0:r1, c0:c1] += 1
  assert covered.max() == 1 and np.all(covered[np.triu_indices(n_rows)] == 1)
  assert len(blocks) <= 2 * workers + workers * tail_halvings + 2


def test_balanced_plan_sizes_from_the_worker_count():
  spans = [(0, 100), (100, 5100)]
  for workers in (8, 64, 256):
    blocks = block_plan.balanced_blocks(100, spans, workers)
    pairs = np.array([(r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1), _ in blocks])
    assert pairs.sum() == 100 * 5100
    # About 2 equal shares per worker, then smaller ones; the last ones a quarter of a share.
    assert 2 * workers <= len(blocks) <= 6 * workers
    assert pairs[:workers].min() > 2 * pairs[-workers // 2:].max()
  tiles = block_plan.tile_blocks(100, spans, 64)
  assert len(tiles) == 2 * (2 + 79)


# -- Simulated workers give the right answers. ---------------------------------------------------

@pytest.mark.parametrize('plan,broadcast', list(itertools.product(block_plan.PLANS,
                                                                  distributed_kernels.BROADCASTS)))
def test_simulated_fleet_answers_the_surrogate_kernel(plan, broadcast):
  train, key, (support, *_) = _kip_problem()
  rows = np.arange(0, 60, 3)
  targets = sources.DatasetRows(train[rows], key, rows)
  both = sources.concat([support, targets])
  g = np.random.default_rng(5).normal(size=(6, 26)).astype(np.float32)
  fleet = sim.Fleet(16, QUICK, datasets={key: train})
  with distributed_kernels.DistributedKernels(fleet.handles, block=4, plan=plan,
                                              broadcast=broadcast, **FAST) as distributed:
    full = sources.as_array(both)
    k = distributed.kernel(support, both)
    np.testing.assert_allclose(k['ntk'], sim.surrogate_kernel(support, full)['ntk'], atol=1e-6)
    np.testing.assert_allclose(k['nngp'], 0.5 * k['ntk'], atol=1e-6)
    np.testing.assert_allclose(distributed.vjp(support, both, g, g),
                               sim.surrogate_vjp(support, full, g, g), atol=1e-5)
    symmetric = distributed.kernel(support)['ntk']
    np.testing.assert_allclose(symmetric, sim.surrogate_kernel(support, support)['ntk'],
                               atol=1e-6)
    status = distributed.status()
  assert status['index_blocks'] > 0 and status['pixel_fallback_blocks'] == 0
  assert status['alive_workers'] == 16
  used = sum(w['blocks_done'] > 0 for w in status['workers'])
  if broadcast == 'tree':
    # Most copies of the support went worker to worker, not from the coordinator.
    assert status['tree_fetches'] >= used - 2 and status['cache_sends'] < status['tree_fetches']
  else:
    assert status['tree_fetches'] == 0 and status['cache_sends'] >= used


def test_a_calls_own_shares_change_its_plan_not_its_values():
  """kernel(shares=...) (the fused step's K_ss: one block per worker) plans that call with its
  own shares, and the kernel is the same."""
  _, _, (support, *_) = _kip_problem()
  support = np.random.default_rng(2).normal(size=(40,) + support.shape[1:]).astype(np.float32)
  fleet = sim.Fleet(16, QUICK)
  with distributed_kernels.DistributedKernels(fleet.handles, block=4, plan='balanced',
                                              **FAST) as distributed:
    default = distributed.kernel(support)['ntk']
    blocks_default = distributed.status()['blocks_done']
    one_each = distributed.kernel(support, shares=(1, 0))['ntk']
    blocks_one_each = distributed.status()['blocks_done'] - blocks_default
  np.testing.assert_array_equal(one_each, default)
  assert blocks_one_each < blocks_default


@pytest.mark.parametrize('group_size', [1, 4])
def test_simulated_kip_step_equals_the_inprocess_step_exactly(group_size):
  """Simulated workers computing for real on the same plan give the in-process bits."""
  train, key, args = _kip_problem(seed=1)
  spec = dict(plan='balanced', broadcast='tree', block=4, group_size=group_size, **FAST)
  fleet = sim.Fleet(16, sim.SimParams(time_scale=1e-3, compute='real'), arch=FC.to_dict(),
                    datasets={key: train})
  with distributed_kernels.DistributedKernels(fleet.handles, **spec) as simulated:
    _wait_for_pings(simulated, 16)
    sim_step = kip.kip_gradients(simulated, *args)
    assert simulated.status()['tree_fetches'] > 0
  # The in-process launch's path: 16 real KernelWorkers holding the same dataset rows.
  workers = [kernel_worker.KernelWorker(FC.to_dict(), worker_id=i) for i in range(16)]
  handles = [LocalWorkerHandle(w) for w in workers]
  for w in workers:
    w._datasets[key] = train
    w.connect_peers(dict(enumerate(handles)))
  with distributed_kernels.DistributedKernels(handles, **spec) as distributed:
    _wait_for_pings(distributed, 16)
    real_step = kip.kip_gradients(distributed, *args)
    status = distributed.status()
    assert status['index_blocks'] > 0
    if group_size > 1:   # one request per group of 4 per round, not one per block
      assert status['requests_done'] <= 2 * 4 < status['blocks_done']
  assert sim_step.loss == real_step.loss
  np.testing.assert_array_equal(sim_step.grad_images, real_step.grad_images)
  np.testing.assert_array_equal(sim_step.grad_labels, real_step.grad_labels)
  # And both agree with the engine called directly.
  _assert_matches_engine(sim_step, args)


def _assert_matches_engine(step: kip.KipStep, args: tuple) -> None:
  """`step` agrees with the engine called directly on `args` (other tile shapes: float32
  rounding, which the KRR solve amplifies; see test_coordinator's KIP test)."""
  direct = kip.kip_gradients(backend.InProcessKernels(FC), *args)
  np.testing.assert_allclose(step.grad_images, direct.grad_images, rtol=0,
                             atol=1e-2 * np.abs(direct.grad_images).max())
  assert abs(step.loss - direct.loss) < 1e-4 * abs(direct.loss)


@pytest.mark.parametrize('options', [dict(one_kernel=True),
                                     dict(cotangent_factors=True),
                                     dict(one_kernel=True, cotangent_factors=True),
                                     dict(one_kernel=True, cotangent_factors=True,
                                          requests_per_group=2)])
def test_lean_kip_step_equals_the_default_group_step(options):
  """The round-3 wire options on 16 simulated workers computing for real, groups of 4:
  one_kernel gives the default step's bits (the same kernel values, half the answer); the
  factored cotangents agree with the dense ones to float32 rounding (the leaders form each
  block's cotangent from float64 factors, in another summation order than the dense matrix),
  and both agree with the engine called directly as the default step does; a head and a tail
  request per group sum the vjp's partial gradients in other groups (float32 rounding)."""
  train, key, args = _kip_problem(seed=1)
  spec = dict(plan='balanced', broadcast='tree', block=4, group_size=4, **FAST)
  steps, statuses = [], []
  for extra in ({}, options):
    fleet = sim.Fleet(16, sim.SimParams(time_scale=1e-3, compute='real'), arch=FC.to_dict(),
                      datasets={key: train})
    with distributed_kernels.DistributedKernels(fleet.handles, **spec, **extra) as distributed:
      _wait_for_pings(distributed, 16)
      steps.append(kip.kip_gradients(distributed, *args))
      statuses.append(distributed.status())
  (dense, lean), (before, after) = steps, statuses
  split = options.get('requests_per_group', 1)
  assert after['requests_done'] <= 2 * 4 * split < after['blocks_done']
  if split > 1:   # heads and tails: more requests than groups per round
    assert after['requests_done'] > 2 * 4
  assert after['members_dropped'] == 0 and after['tree_fetches'] > 0
  if options.get('cotangent_factors') or split > 1:
    # The factors reached the leaders as a cache (at this size they are more bytes than
    # the matrix: (6 + 26 + 1) x 6 float64 against 6 x 26 float32; BENCHMARKS.md has sizes).
    assert after['cache_sends'] + after['tree_fetches'] > before['cache_sends'] + before[
        'tree_fetches'] or not options.get('cotangent_factors')
    assert abs(lean.loss - dense.loss) == 0          # the kernel round is unchanged
    np.testing.assert_array_equal(lean.grad_labels, dense.grad_labels)
    np.testing.assert_allclose(lean.grad_images, dense.grad_images, rtol=0,
                               atol=1e-5 * np.abs(dense.grad_images).max())
  else:
    # One kernel of two came back: K(support, [support; targets]) of float32 less.
    assert before['bytes_received'] - after['bytes_received'] >= 4 * 6 * (6 + 20)
    assert lean.loss == dense.loss
    np.testing.assert_array_equal(lean.grad_images, dense.grad_images)
    np.testing.assert_array_equal(lean.grad_labels, dense.grad_labels)
  _assert_matches_engine(lean, args)


def test_factored_vjp_without_groups_uses_the_dense_matrix():
  """A low-rank cotangent on block requests (group_size 1) is formed on the coordinator: the
  same gradient as the dense matrix given directly, bit for bit."""
  from ntkdd.common import cotangents
  train, key, (support, *_) = _kip_problem(seed=4)
  rows = np.arange(0, 60, 3)
  both = sources.concat([support, sources.DatasetRows(train[rows], key, rows)])
  rng = np.random.default_rng(7)
  g = cotangents.LowRankCotangent(rng.normal(size=(6, 2)), rng.normal(size=(26, 2)), 0.3)
  fleet = sim.Fleet(8, QUICK, datasets={key: train})
  with distributed_kernels.DistributedKernels(fleet.handles, block=4, plan='balanced',
                                              broadcast='tree', **FAST) as distributed:
    _wait_for_pings(distributed, 8)
    np.testing.assert_array_equal(distributed.vjp(support, both, g),
                                  distributed.vjp(support, both, g.dense()))
    with pytest.raises(ValueError, match='do not make a'):
      distributed.vjp(support, both, g._replace(right=g.right[:5]))


def test_factored_cotangents_refused_clearly_by_older_workers(monkeypatch):
  """Workers whose ping lacks 'vjp_factors' make the coordinator say so before sending; a
  leader that does not know the method refuses it by name (an older ntkdd), never runs the
  blocks without their cotangents."""
  from ntkdd.common import cotangents
  from ntkdd.workers import group_leader
  train, key, (support, *_) = _kip_problem(seed=4)
  both = sources.concat([support, sources.DatasetRows(train[:20], key, np.arange(20))])
  g = cotangents.LowRankCotangent(np.ones((6, 1)), np.ones((26, 1)), 0.0)
  monkeypatch.setattr(protocol, 'FEATURES', (protocol.KERNELS_FIELD,))   # as older pings
  fleet = sim.Fleet(8, QUICK, datasets={key: train})
  with distributed_kernels.DistributedKernels(fleet.handles, plan='balanced', broadcast='tree',
                                              group_size=4, cotangent_factors=True,
                                              **FAST) as distributed:
    _wait_for_pings(distributed, 8)
    with pytest.raises(RuntimeError, match="do not serve 'vjp_factors'"):
      distributed.vjp(support, both, g)
  monkeypatch.setattr(group_leader, 'METHODS', ('kernel_block', 'vjp_block'))
  leader = fleet.workers[0]
  request = {'method': protocol.VJP_FACTORS, 'members': ['0', '1'],
             'blocks': [[0, 2, 0, 6, 0]], 'parts': [{'start': 0, 'cache': 'rows', 'version': 3}],
             'rows_cache': 'rows', 'rows_version': 3, 'caches': {},
             'cotangent_factors': {'g_ntk': {'cache': 'factors_ntk', 'version': 1, 'rows': 6}}}
  refused = protocol.decode(leader.group_blocks(protocol.encode(request)))
  assert not refused['ok'] and refused['error'] == 'bad_request'
  assert 'vjp_factors' in refused['message']


def test_workers_answer_only_the_kernels_asked_for():
  fleet = sim.Fleet(2, QUICK, arch=FC.to_dict())
  worker = fleet.workers[0]
  images = _images(5, 2)
  request = {'rows': images, 'cols': images}
  both = protocol.decode(worker.kernel_block(protocol.encode(request)))
  one = protocol.decode(worker.kernel_block(protocol.encode({**request, 'kernels': ['nngp']})))
  assert set(both) >= {'ntk', 'nngp'} and 'ntk' not in one
  np.testing.assert_array_equal(one['nngp'], both['nngp'])
  for bad in (['ntk', 'ntk'], [], ['rbf'], 'ntk'):
    refused = protocol.decode(worker.kernel_block(protocol.encode({**request, 'kernels': bad})))
    assert not refused['ok'] and refused['error'] == 'bad_request'
  assert set(protocol.decode(worker.ping())['features']) == set(protocol.FEATURES)


def _wait_for_pings(distributed, workers, timeout_s=10.0):
  """Until every worker has answered its first ping (so group requests are possible)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    status = distributed.status()
    if status['alive_workers'] == workers and all(w['device'] for w in status['workers']):
      return
    time.sleep(0.01)
  raise AssertionError(f'not every worker answered a ping: {distributed.status()}')


@pytest.mark.parametrize('plan', block_plan.PLANS)
def test_group_requests_give_the_per_block_kernels_and_one_sum_per_group(plan):
  """group_size=4: 16 simulated workers answer 4 requests per round; the kernels are the
  per-block ones bit for bit, the gradient the same up to the order of its sums."""
  train, key, (support, *_) = _kip_problem(seed=3, n_s=7)
  rows = np.arange(0, 60, 2)
  both = sources.concat([support, sources.DatasetRows(train[rows], key, rows)])
  g = np.random.default_rng(6).normal(size=(7, 37)).astype(np.float32)
  answers = {}
  for group_size in (1, 4):
    fleet = sim.Fleet(16, QUICK, datasets={key: train})
    with distributed_kernels.DistributedKernels(fleet.handles, block=4, plan=plan, broadcast='tree',
                                        group_size=group_size, **FAST) as distributed:
      _wait_for_pings(distributed, 16)
      answers[group_size] = (distributed.kernel(support, both), distributed.kernel(support),
                             distributed.vjp(support, both, g, None))
      status = distributed.status()
    if group_size > 1:
      assert status['requests_done'] <= 3 * 4 < status['blocks_done']
      assert status['members_dropped'] == 0
  (k1, sym1, grad1), (k4, sym4, grad4) = answers[1], answers[4]
  for name in ('ntk', 'nngp'):
    np.testing.assert_array_equal(k4[name], k1[name])
    np.testing.assert_array_equal(sym4[name], sym1[name])
  full = sources.as_array(both)
  np.testing.assert_allclose(grad4, grad1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad4, sim.surrogate_vjp(support, full, g), atol=1e-5)


@pytest.mark.parametrize('n_rows,workers,group', [(100, 256, 16), (500, 256, 16), (100, 64, 8),
                                                  (500, 64, 8), (100, 8, 1), (37, 24, 4)])
def test_first_wave_has_exactly_two_shares_per_worker_and_member(n_rows, workers, group):
  """Pieces cut from whole strips come out a little under a share; a wave ended by its pairs
  held 520-533 blocks for 512 slots at 256 workers, so some members got a third share."""
  blocks = block_plan.balanced_blocks(n_rows, [(0, n_rows), (n_rows, n_rows + 5000)], workers)
  pairs = [block_plan._pairs(b) for b in blocks]
  wave = sum(1 for p in pairs if p >= block_plan.SAME_SIZE * pairs[0])
  assert wave == 2 * workers
  dealt = block_plan.group_blocks(blocks, workers // group)
  assert [sum(1 for i in d if i < wave) for d in dealt] == [2 * group] * (workers // group)


def test_group_requests_touch_few_gradient_rows():
  """Each size class but the last goes in row-ordered runs, so a request's summed partial
  gradient has few rows: 369 over 16 requests here, 617 when only the first wave did."""
  blocks = block_plan.balanced_blocks(100, [(0, 100), (100, 5100)], 256)
  dealt = block_plan.group_blocks(blocks, 16)
  rows = [len({r for i in request for r in range(*blocks[i][0])}) for request in dealt]
  assert sum(rows) < 450
  loads = [sum(block_plan._pairs(blocks[i]) for i in request) for request in dealt]
  assert max(loads) - min(loads) < 0.01 * np.mean(loads)


@pytest.mark.parametrize('n_rows,n_cols,groups,pieces', [(500, 500, 16, 64), (6, 6, 4, 4),
                                                         (100, 100, 16, 12), (7, 3, 2, 5)])
def test_strip_requests_give_each_request_its_own_rows(n_rows, n_cols, groups, pieces):
  """Every pair once; each request a strip of rows no other request touches (so each
  gradient row crosses the coordinator's link once), cut into at most `pieces` blocks."""
  blocks, deal = block_plan.strip_requests(n_rows, n_cols, groups, pieces)
  covered = np.zeros((n_rows, n_cols), int)
  for (r0, r1), (c0, c1), span in blocks:
    assert span == 0 and r0 < r1 and c0 < c1
    covered[r0:r1, c0:c1] += 1
  assert (covered == 1).all()
  assert sorted(i for dealt in deal for i in dealt) == list(range(len(blocks)))
  rows = [{r for i in dealt for r in range(*blocks[i][0])} for dealt in deal]
  assert sum(len(r) for r in rows) == n_rows and len(deal) == min(groups, n_rows)
  assert all(len(dealt) <= pieces for dealt in deal)
  assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_group_blocks_deals_every_block_once_in_equal_shares():
  blocks = block_plan.balanced_blocks(100, [(0, 100), (100, 5100)], 256)
  dealt = block_plan.group_blocks(blocks, 16)
  assert sorted(i for group in dealt for i in group) == list(range(len(blocks)))
  assert all(group == sorted(group) for group in dealt)      # each in plan order
  loads = [sum(block_plan._pairs(blocks[i]) for i in group) for group in dealt]
  assert max(loads) - min(loads) <= max(block_plan._pairs(b) for b in blocks[-16:])
  assert block_plan.group_blocks(blocks, 16) == dealt
  assert len(block_plan.group_blocks(blocks[:3], 16)) == 3


# -- Faults at scale. ----------------------------------------------------------------------------

LEAN = dict(one_kernel=True, cotangent_factors=True)


@pytest.mark.parametrize('broadcast,group_size,extra', [
    ('direct', 1, {}), ('tree', 1, {}), ('tree', 4, {}), ('tree', 4, LEAN),
    ('tree', 4, dict(LEAN, requests_per_group=2))])
def test_coordinator_survives_workers_that_die_hang_and_come_back(broadcast, group_size, extra):
  """extra: one_kernel and cotangent_factors (the vjp's cotangent as factors: leaders that
  come back re-fetch them, and members their blocks' cotangents from their leaders), and a
  head and a tail request per group (a tail whose leader died goes to another group)."""
  from ntkdd.common import cotangents
  lean = bool(extra)
  train, key, args = _kip_problem(seed=2, n_s=9, n_t=30)
  support, _, targets = args[:3]
  both = sources.concat([support, targets])
  full = sources.as_array(both)
  fleet = sim.Fleet(16, QUICK, datasets={key: train})
  with distributed_kernels.DistributedKernels(fleet.handles, block=3, plan='balanced',
                                              broadcast=broadcast, group_size=group_size,
                                              **extra, **FAST) as distributed:
    names = ('ntk',) if lean else ('ntk', 'nngp')
    _wait_for_pings(distributed, 16)
    want = sim.surrogate_kernel(support, full)['ntk']
    np.testing.assert_allclose(distributed.kernel(support, both)['ntk'], want, atol=1e-6)
    # A tight deadline only once faults come: a first call slowed by a busy machine (CI,
    # 16 worker threads and the coordinator's on 2 cores) must not count as the hangs below.
    distributed.deadline_s = 0.5
    for i in (1, 2, 3):
      fleet.kill(i)
    for i in (4, 5):
      fleet.hang(i, 2.0)
    support = support + 0.1       # a new support: a new broadcast, through dead holders
    both = sources.concat([support, targets])
    full = sources.as_array(both)

    def faults_seen(status):
      down = {w['worker'] for w in status['workers'] if not w['alive']}
      if group_size == 1:
        return {1, 2, 3} <= down and all(status['workers'][i]['failures'] for i in (1, 2, 3, 4, 5))
      return ({1, 2, 3} <= down and status['members_dropped'] >= 3
              and status['workers'][4]['failures'])

    # Rounds until every faulty worker has been given work and flagged (two suffice on a quiet
    # machine; on a loaded one a worker's slot may find the queue already emptied by others),
    # each round's answer exact.
    for _ in range(8):
      answer = distributed.kernel(support, both, names=names)
      assert set(answer) == set(names)
      np.testing.assert_allclose(answer['ntk'], sim.surrogate_kernel(support, full)['ntk'],
                                 atol=1e-6)
      if faults_seen(distributed.status()):
        break
    status = distributed.status()
    # The dead are down and every faulty worker failed (direct); or the members their leaders
    # dropped, and the hung leader (groups).
    assert faults_seen(status), [(w['worker'], w['alive'], w['failures'])
                                 for w in status['workers']]
    for i in (1, 2, 3, 4, 5):       # back, as restarted processes without their caches
      fleet.restart(i)
    deadline = time.monotonic() + 10
    while distributed.status()['alive_workers'] < 16 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert distributed.status()['alive_workers'] == 16
    # What follows is about the returned workers doing work again, not about deadlines: a
    # busy CI machine stalling all 16 threads past a 0.5 s deadline would drop healthy
    # leaders (seen once: 14 of 16 alive), so the deadline goes back to the fleet's own.
    distributed.deadline_s = FAST['deadline_s']
    before = {w['worker']: w['blocks_done'] for w in distributed.status()['workers']}
    g = np.ones((9, len(full)), np.float32)
    given = cotangents.LowRankCotangent(np.ones((9, 1)), np.ones((len(full), 1)), 0.0) if (
        lean) else g
    for _ in range(3):
      np.testing.assert_allclose(distributed.vjp(support, both, given, None),
                                 sim.surrogate_vjp(support, full, g), atol=1e-5)
    after = {w['worker']: w['blocks_done'] for w in distributed.status()['workers']}
    if group_size > 1:   # the returned ones compute for their leaders again (re-fetching
      # the images they lost), none dropped again
      final = distributed.status()
      assert final['alive_workers'] == 16
      assert final['members_dropped'] == status['members_dropped']
      return
  assert any(after[i] > before[i] for i in (1, 2, 3, 4, 5))   # the returned ones work again


def test_all_simulated_workers_dead_raises():
  fleet = sim.Fleet(16, QUICK)
  for i in range(16):
    fleet.kill(i)
  with distributed_kernels.DistributedKernels(fleet.handles, plan='balanced', broadcast='tree',
                                              **dict(FAST, grace_s=0.3)) as distributed:
    with pytest.raises(distributed_kernels.WorkersUnavailable, match='All 16 kernel workers'):
      distributed.kernel(_images(4, 0))


# -- The worker side of the tree. ----------------------------------------------------------------

def test_fetch_images_from_a_peer_and_its_errors(monkeypatch):
  monkeypatch.setattr(kernel_worker, 'PEER_ANNOUNCE_S', 0.05)
  workers = [kernel_worker.KernelWorker(FC.to_dict(), worker_id=i) for i in range(3)]
  lonely = kernel_worker.KernelWorker(FC.to_dict(), worker_id=9)
  for w in workers:
    w.connect_peers(dict(enumerate(workers)))
  images = _images(5, 3)
  payload = protocol.encode({'images': images})
  assert protocol.decode(workers[0].set_images('rows', 7, payload))['ok']
  assert protocol.decode(workers[1].fetch_images('rows', 7, '0'))['ok']
  assert protocol.decode(workers[2].fetch_images('rows', 7, '1'))['ok']     # a copy of a copy
  np.testing.assert_array_equal(protocol.decode(workers[2].cached_images('rows', 7))['images'],
                                images)
  assert protocol.decode(workers[2].ping())['peers'] == 2
  stale = protocol.decode(workers[1].fetch_images('rows', 8, '0'))
  assert not stale['ok'] and stale['error'] == 'stale_cache' and 'peer 0' in stale['message']
  unknown = protocol.decode(lonely.fetch_images('rows', 7, '0'))
  assert not unknown['ok'] and unknown['error'] == 'bad_request' and 'no peer' in unknown['message']


def test_group_leader_drops_a_dead_member_and_refuses_bad_requests():
  fleet = sim.Fleet(4, QUICK, arch=FC.to_dict())
  leader = fleet.workers[0]
  images = _images(6, 4)
  assert protocol.decode(leader.set_images('rows', 3, protocol.encode({'images': images})))['ok']
  fleet.kill(2)
  request = {'method': 'kernel_block', 'members': ['0', '1', '2', '3'],
             'blocks': [[0, 2, 0, 6, 0], [2, 4, 0, 6, 0], [4, 6, 0, 6, 0], [0, 6, 0, 3, 0]],
             'parts': [{'start': 0, 'cache': 'rows', 'version': 3}],
             'rows_cache': 'rows', 'rows_version': 3, 'caches': {'rows': 3}}
  answer = protocol.decode(fleet.handles[0].group_blocks(protocol.encode(request)))
  assert answer['ok'] and set(answer['dropped']) == {'2'}
  want = sim.surrogate_kernel(images, images)['ntk']
  # The blocks' values flattened in block order: three 2x6 strips, then a 6x3 block.
  np.testing.assert_allclose(answer['ntk'][:36], want.reshape(-1), atol=1e-6)
  np.testing.assert_allclose(answer['ntk'][36:], want[:, :3].reshape(-1), atol=1e-6)
  for bad, message in [({'method': 'nope'}, 'method'), ({'members': []}, 'members'),
                       ({'blocks': [[0, 2, 0, 6, 5]]}, 'blocks'),
                       ({'caches': {'rows': 4}}, 'cache')]:
    refused = protocol.decode(fleet.handles[0].group_blocks(protocol.encode({**request, **bad})))
    assert not refused['ok'] and message in refused['message']
    assert refused['error'] in ('bad_request', 'stale_cache')


# -- The fused KIP step (issue 18). --------------------------------------------------------------

@pytest.mark.parametrize('compute', ['real', 'sleep'])
def test_fused_kip_step_equals_the_two_round_step(compute):
  """The fused step (K_ss, then each target block's forward, residual and vjp in one member
  call, the kept sums added on a worker, then K_ss's vjp) gives the two-round step's loss,
  label gradient and image gradient to float32 rounding, on simulated workers computing for
  real (and on the surrogate kernel), and its requests are group requests throughout."""
  train, key, args = _kip_problem(seed=2)
  spec = dict(plan='balanced', broadcast='tree', block=4, group_size=4, one_kernel=True,
              cotangent_factors=True, **FAST)
  steps, statuses = [], []
  for fused in (False, True):
    fleet = sim.Fleet(16, sim.SimParams(time_scale=1e-3, compute=compute), arch=FC.to_dict(),
                      datasets={key: train})
    with distributed_kernels.DistributedKernels(fleet.handles, fused_step=fused,
                                                **spec) as distributed:
      _wait_for_pings(distributed, 16)
      steps.append(kip.kip_gradients(distributed, *args))
      statuses.append(distributed.status())
  (two_round, fused), status = steps, statuses[1]
  assert status['members_dropped'] == 0 and status['blocks_requeued'] == 0
  # K_ss, the fused round, K_ss's vjp: 4 group requests each; the sum: one more request.
  assert status['requests_done'] == 3 * 4 < status['blocks_done']
  assert abs(fused.loss - two_round.loss) <= 1e-5 * abs(two_round.loss)
  assert fused.target_accuracy == two_round.target_accuracy
  np.testing.assert_allclose(fused.grad_labels, two_round.grad_labels, rtol=0,
                             atol=1e-4 * np.abs(two_round.grad_labels).max())
  # K_ss comes from its own symmetric call here, from K(support, [support; targets])'s blocks
  # there: float32 rounding apart, which the solve (reg 1e-6) amplifies to ~1e-4 of the largest.
  np.testing.assert_allclose(fused.grad_images, two_round.grad_images, rtol=0,
                             atol=1e-3 * np.abs(two_round.grad_images).max())
  if compute == 'real':
    _assert_matches_engine(fused, args)


def test_fused_kip_step_falls_back_without_groups():
  """Without group requests (group_size 1) the fused step says so and KIP runs two rounds:
  the same bits as a backend without fused_step."""
  train, key, args = _kip_problem(seed=3)
  results = []
  for fused in (False, True):
    fleet = sim.Fleet(8, QUICK, datasets={key: train})
    with distributed_kernels.DistributedKernels(fleet.handles, plan='balanced', block=4,
                                                fused_step=fused, **FAST) as distributed:
      _wait_for_pings(distributed, 8)
      results.append(kip.kip_gradients(distributed, *args))
  assert results[0].loss == results[1].loss
  np.testing.assert_array_equal(results[0].grad_images, results[1].grad_images)


def test_kip_targets_keeps_the_sum_and_sum_caches_adds_it_over_peers():
  """A kip_targets group request answers K r and the predictions and keeps its gradient,
  which sum_caches on another worker fetches and adds; bad requests get one clear error."""
  fleet = sim.Fleet(4, QUICK, arch=FC.to_dict())
  support, cols = _images(3, 5), _images(5, 6)
  for worker in fleet.workers[:2]:
    for name, images in (('rows', support), ('cols', cols)):
      assert protocol.decode(worker.set_images(name, 7, protocol.encode({'images': images})))['ok']
  alpha = np.random.default_rng(0).normal(size=(3, 2))
  labels = np.random.default_rng(1).normal(size=(5, 2))
  request = {'method': protocol.KIP_TARGETS, 'members': ['0', '1'],
             'blocks': [[0, 3, 0, 2, 0], [0, 3, 2, 5, 0]],
             'parts': [{'start': 0, 'cache': 'cols', 'version': 7}],
             'rows_cache': 'rows', 'rows_version': 7, 'caches': {'rows': 7, 'cols': 7},
             'kernel': 'ntk', 'alpha': alpha, 'target_labels': labels,
             'keep_grad': {'name': 'kip_grad0', 'version': 9}}
  answer = protocol.decode(fleet.handles[0].group_blocks(protocol.encode(request)))
  assert answer['ok'] and answer['kept'] and answer['kept_by'] == '0' and 'grad' not in answer
  k = sim.surrogate_kernel(support, cols)['ntk'].astype(np.float64)
  residual = k.T @ alpha - labels
  np.testing.assert_allclose(answer['predictions'], k.T @ alpha, rtol=1e-5)
  np.testing.assert_allclose(answer['k_r'], k @ residual, rtol=1e-5, atol=1e-6)
  want = sim.surrogate_vjp(support, cols, (alpha @ residual.T).astype(np.float32))
  summed = protocol.decode(fleet.handles[3].sum_caches(protocol.encode(
      {'caches': [['0', 'kip_grad0', 9], ['0', 'kip_grad0', 9]]})))
  assert summed['ok']
  np.testing.assert_allclose(summed['grad'], 2 * want, rtol=1e-4, atol=1e-6)
  for bad, message in [({'kernel': 'rbf'}, 'kernel'), ({'target_labels': labels[:4]}, 'labels'),
                       ({'blocks': [[1, 3, 0, 5, 0]]}, 'every support row'),
                       ({'keep_grad': {'name': 3}}, 'keep_grad')]:
    refused = protocol.decode(fleet.handles[0].group_blocks(protocol.encode({**request, **bad})))
    assert not refused['ok'] and refused['error'] == 'bad_request'
    assert message in refused['message']
  for caches, error in [([['9', 'kip_grad0', 9]], 'bad_request'),
                        ([['0', 'kip_grad0', 8]], 'stale_cache'), ([], 'bad_request')]:
    refused = protocol.decode(fleet.handles[3].sum_caches(protocol.encode({'caches': caches})))
    assert not refused['ok'] and refused['error'] == error


def test_fused_step_redone_in_two_rounds_when_a_kept_sum_is_lost(monkeypatch):
  """A leader that goes down holding its kept sum: the step is computed again in two rounds
  (the same bits as a backend without the fused step), not lost."""
  from ntkdd.server import fused_step
  train, key, args = _kip_problem(seed=4)
  spec = dict(plan='balanced', broadcast='tree', block=4, group_size=4, **FAST)
  results = []
  for fused in (False, True):
    if fused:
      def lost(self, x1, kept):
        raise distributed_kernels._WorkerFault(f'worker {kept[0][0]} is gone')
      monkeypatch.setattr(fused_step.FusedKipStep, '_sum_kept', lost)
    fleet = sim.Fleet(16, QUICK, datasets={key: train})
    with distributed_kernels.DistributedKernels(fleet.handles, fused_step=fused,
                                                **spec) as distributed:
      _wait_for_pings(distributed, 16)
      results.append(kip.kip_gradients(distributed, *args))
  assert results[0].loss == results[1].loss
  np.testing.assert_array_equal(results[0].grad_images, results[1].grad_images)
  np.testing.assert_array_equal(results[0].grad_labels, results[1].grad_labels)


# -- The overlapped fused step: K_ss inside the fused round (issue 18). --------------------------

def _kip_step_on_fleet(args, train, key, fused, kill=(), compute='sleep', hang=()):
  fleet = sim.Fleet(16, sim.SimParams(time_scale=1e-3, compute=compute), arch=FC.to_dict(),
                    datasets={key: train})
  spec = dict(plan='balanced', broadcast='tree', block=4, group_size=4, one_kernel=True,
              cotangent_factors=True, **FAST)
  with distributed_kernels.DistributedKernels(fleet.handles, fused_step=fused,
                                              **spec) as distributed:
    _wait_for_pings(distributed, 16)
    for index in kill:   # down after the pings: the coordinator learns it from the calls
      fleet.kill(index)
    for index in hang:   # each call to it hangs a second, then fails
      fleet.hang(index, 1.0)
    return kip.kip_gradients(distributed, *args), distributed.status()


@pytest.mark.parametrize('compute', ['real', 'sleep'])
def test_overlapped_step_equals_the_fused_step_bit_for_bit(compute):
  """fused_step='overlap' computes K_ss's blocks inside the fused round (the members send them
  to their leaders, the coordinator gathers them and sends alpha back mid-round) with the
  plan and worker code of the fused step's own K_ss call: the same K_ss, alpha, loss and
  predictions bit for bit, in one round fewer (the fused round and K_ss's vjp: 4 group requests
  each); beta by the inverse computed during the round (float64 rounding), and K_ss's vjp in
  row strips (block_plan.strip_requests: other partial sums, float32 rounding)."""
  train, key, args = _kip_problem(seed=2)
  fused, _ = _kip_step_on_fleet(args, train, key, True, compute=compute)
  overlapped, status = _kip_step_on_fleet(args, train, key, 'overlap', compute=compute)
  assert status['requests_done'] == 2 * 4 and status['members_dropped'] == 0
  assert overlapped.loss == fused.loss
  np.testing.assert_allclose(overlapped.grad_labels, fused.grad_labels, rtol=1e-9,
                             atol=1e-12 * np.abs(fused.grad_labels).max())
  np.testing.assert_allclose(overlapped.grad_images, fused.grad_images, rtol=0,
                             atol=1e-4 * np.abs(fused.grad_images).max())
  if compute == 'real':
    _assert_matches_engine(overlapped, args)


@pytest.mark.parametrize('kill', [(5,), (0, 4, 8, 12)])
def test_overlapped_step_survives_members_and_leaders_going_down(kill):
  """A member down before the round (its block, K_ss blocks included, goes to the others of its
  group) and a worker of every group down (some lead: their requests go to other workers and
  the gathers follow them): the step completes with the undisturbed step's bits."""
  train, key, args = _kip_problem(seed=5)
  want, _ = _kip_step_on_fleet(args, train, key, 'overlap')
  got, status = _kip_step_on_fleet(args, train, key, 'overlap', kill=kill)
  assert status['alive_workers'] == 16 - len(kill)
  assert status['members_dropped'] + status['blocks_requeued'] >= 1   # a fault path ran
  assert got.loss == want.loss
  np.testing.assert_array_equal(got.grad_images, want.grad_images)


def test_overlapped_step_survives_a_hung_leader_and_a_hung_member():
  """A leader (4) and a member of another group (9) that hang, then fail, during the step
  with the early K_ss vjp (K r pushed to leaders, K_ss's vjp handed to them): the requests
  move, the members are dropped, and the step ends with the undisturbed step's bits."""
  train, key, args = _kip_problem(seed=5)
  want, _ = _kip_step_on_fleet(args, train, key, 'overlap')
  got, status = _kip_step_on_fleet(args, train, key, 'overlap', hang=(4, 9))
  assert status['members_dropped'] + status['blocks_requeued'] >= 1   # a fault path ran
  assert got.loss == want.loss
  np.testing.assert_array_equal(got.grad_images, want.grad_images)
  np.testing.assert_array_equal(got.grad_labels, want.grad_labels)


def test_gather_caches_waits_for_entries_sent_after_the_request():
  """gather_caches may reach the leader before its members' blocks do (the overlapped step
  sends it at once): it waits for them, and answers them flattened in the order asked."""
  fleet = sim.Fleet(2, QUICK, arch=FC.to_dict())
  blocks = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 2), np.float32)]
  request = protocol.encode({'caches': [['0', 'kss3', 4], ['0', 'kss7', 4]]})
  answers = []
  thread = threading.Thread(target=lambda: answers.append(
      protocol.decode(fleet.handles[0].gather_caches(request))))
  thread.start()
  time.sleep(0.3)
  for name, block in zip(('kss7', 'kss3'), blocks[::-1]):
    assert protocol.decode(fleet.workers[0].set_images(name, 4, protocol.encode(
        {'images': block})))['ok']
  thread.join(10)
  assert answers and answers[0]['ok']
  np.testing.assert_array_equal(answers[0]['values'], np.concatenate([b.ravel() for b in blocks]))
  refused = protocol.decode(fleet.handles[0].gather_caches(protocol.encode({'caches': []})))
  assert not refused['ok'] and refused['error'] == 'bad_request'



@pytest.mark.parametrize('compute', ['real', 'sleep'])
def test_early_kss_vjp_keeps_the_bits_of_the_vjp_after_the_round(compute, monkeypatch):
  """early_kss_vjp (the default): the members send their blocks' K r to their leaders before
  their vjps, the coordinator sums them there mid-round and hands K_ss's vjp to the round's
  leaders then (one strip request each). Beta, and so K_ss's vjp and the gradients, keep the
  bits of K_ss's vjp run after the round; workers that do not list protocol.KIP_EARLY_BETA
  get the step without it."""
  train, key, args = _kip_problem(seed=3)
  late_backend = functools.partial(distributed_kernels.DistributedKernels, early_kss_vjp=False)
  with monkeypatch.context() as patch:
    patch.setattr(distributed_kernels, 'DistributedKernels', late_backend)
    late, late_status = _kip_step_on_fleet(args, train, key, 'overlap', compute=compute)
  early, status = _kip_step_on_fleet(args, train, key, 'overlap', compute=compute)
  assert (late_status['early_kss_vjps'], status['early_kss_vjps']) == (0, 1)
  assert (late_status['requests_handed'], status['requests_handed']) == (0, 4)
  assert status['requests_done'] == late_status['requests_done'] == 2 * 4
  assert early.loss == late.loss
  np.testing.assert_array_equal(early.grad_images, late.grad_images)
  np.testing.assert_array_equal(early.grad_labels, late.grad_labels)
  monkeypatch.setattr(protocol, 'FEATURES', tuple(
      f for f in protocol.FEATURES if f != protocol.KIP_EARLY_BETA))
  older, older_status = _kip_step_on_fleet(args, train, key, 'overlap', compute=compute)
  assert older_status['early_kss_vjps'] == 0
  np.testing.assert_array_equal(older.grad_images, late.grad_images)


def test_group_leader_refuses_malformed_k_r_fields():
  """A KIP_TARGETS request whose `kr_cache` or `kr_blocks` is malformed is refused, naming
  the fields."""
  request = {'kr_cache': {'name': 'other', 'version': 1}, 'kr_blocks': [0]}
  with pytest.raises(group_leader.GroupError, match='kr_blocks'):
    group_leader._kr_pushes(request, 1, '0')
  with pytest.raises(group_leader.GroupError, match='kr_cache'):
    group_leader._kr_pushes({'kr_cache': {'name': protocol.KR_CACHE, 'version': 1},
                             'kr_blocks': [0, 1]}, 1, '0')
  assert group_leader._kr_pushes({}, 3, '0') is None
  assert group_leader._kr_pushes({'kr_cache': {'name': protocol.KR_CACHE, 'version': 2},
                                  'kr_blocks': [7]}, 1, '5') == [
      {'name': f'{protocol.KR_CACHE}7', 'version': 2, 'holder': '5'}]
