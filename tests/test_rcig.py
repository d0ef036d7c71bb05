"""RCIG: closed-form readout, Hessian-inverse products, implicit gradients, the loop and resume."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkdd.common import rcig


def test_closed_form_last_layer_matches_gradient_descent():
  rng = np.random.default_rng(0)
  for n, f in ((7, 4), (3, 6)):  # primal and dual forms
    phi = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    l2 = 0.3
    w = rcig.closed_form_last_layer(phi, y, l2)
    objective = lambda w: 0.5 * jnp.sum((phi @ w - y) ** 2) + 0.5 * l2 * jnp.sum(w ** 2)
    lr = 1.0 / (np.linalg.eigvalsh(np.asarray(phi.T @ phi)).max() + l2)
    grad = jax.jit(jax.grad(objective))
    w_gd = jnp.zeros((f, 3))
    for _ in range(3000):
      w_gd = w_gd - lr * grad(w_gd)
    np.testing.assert_allclose(w, w_gd, atol=2e-4)


def test_inner_loss_uses_the_optimal_readout_of_the_linearised_features():
  """The readout is reparameterised: at any delta, the inner loss is the support's ridge
  objective at the readout that is optimal for the features at delta (the pool model's own
  readout plus the ridge correction), and the outer loss predicts with that readout."""
  rng = np.random.default_rng(7)
  cfg = rcig.RcigConfig(width=8, depth=1, l2_rate=0.05)
  params = rcig.init_model(cfg, jax.random.PRNGKey(3), (8, 8, 3), 4)
  support = {'images': jnp.asarray(rng.normal(size=(5, 8, 8, 3)), jnp.float32),
             'labels': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
  x_target = jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32)
  y_target = jnp.array([0, 1, 2, 3, 0, 1])
  ctx = {'params0': params[0], 'readout0': params[1], 'x_target': x_target,
         'y_target': y_target}
  delta = jax.tree_util.tree_map(
      lambda p: 0.3 * jnp.asarray(rng.normal(size=p.shape), jnp.float32), params[0])
  inner, outer = rcig.make_losses(cfg)
  body = rcig.build_body(cfg).apply_fn
  readout = lambda phi: phi @ params[1][0] + params[1][1]  # standard parameterisation
  _, phi = rcig.linearized_features(body, params[0], delta, support['images'])
  phi, labels = np.asarray(phi, np.float64), np.asarray(support['labels'], np.float64)
  prior = labels - np.asarray(readout(phi))
  n, l2 = phi.shape[0], cfg.l2_rate * phi.shape[0]
  w = phi.T @ np.linalg.solve(phi @ phi.T + l2 * np.eye(n), prior)
  np.testing.assert_allclose(phi.T @ (phi @ w - prior) + l2 * w, 0, atol=1e-6 * np.abs(w).max())
  delta_l2 = float(rcig.squared_norm(delta))

  def objective(w):
    return (0.5 * np.sum((prior - phi @ w) ** 2) / n
            + 0.5 * cfg.l2_rate * (np.sum(w ** 2) + delta_l2))

  np.testing.assert_allclose(inner(delta, support, ctx), objective(w), rtol=2e-4)
  assert objective(w + 0.01 * rng.normal(size=w.shape)) > objective(w)
  _, phi_t = rcig.linearized_features(body, params[0], delta, x_target)
  logits = np.asarray(readout(phi_t)) + np.asarray(phi_t, np.float64) @ w
  expected = rcig.cross_entropy(jnp.asarray(logits * np.exp(0.5), jnp.float32), y_target)[0]
  np.testing.assert_allclose(outer(delta, support, 0.5, ctx)[0], expected, rtol=2e-4)


def test_hessian_inverse_vector_product_matches_solve():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  h = (q * np.linspace(1.0, 8.0, 6)) @ q.T
  v = {'a': jnp.asarray(rng.normal(size=4), jnp.float32),
       'b': jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  hj = jnp.asarray(h, jnp.float32)

  def hvp(x):
    flat = hj @ jnp.concatenate([x['a'], x['b']])
    return {'a': flat[:4], 'b': flat[4:]}

  x = rcig.hessian_inverse_vector_product(hvp, v, steps=1500, lr=0.01)
  exact = np.linalg.solve(h, np.concatenate([v['a'], v['b']]))
  np.testing.assert_allclose(np.concatenate([x['a'], x['b']]), exact, rtol=0, atol=2e-2 *
                             np.abs(exact).max())
  # A few steps already beat the line-search start.
  few = rcig.hessian_inverse_vector_product(hvp, v, steps=20, lr=0.1)
  start = rcig.hessian_inverse_vector_product(hvp, v, steps=0, lr=0.1)
  error = lambda t: np.linalg.norm(np.concatenate([t['a'], t['b']]) - exact)
  assert error(few) < error(start)
  # The reparameterised inner loss can be non-convex at delta*: an indefinite H or a zero v
  # gives a finite product (zero for v = 0), never an overflow.
  indefinite = jnp.asarray((q * np.linspace(-2.0, 8.0, 6)) @ q.T, jnp.float32)

  def hvp_indefinite(x):
    flat = indefinite @ jnp.concatenate([x['a'], x['b']])
    return {'a': flat[:4], 'b': flat[4:]}

  for vector in (v, jax.tree_util.tree_map(jnp.zeros_like, v)):
    x = rcig.hessian_inverse_vector_product(hvp_indefinite, vector, steps=20, lr=0.1)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(x))
  assert not np.any(np.asarray(x['a'])) and not np.any(np.asarray(x['b']))


# A ridge-regression inner problem: delta*(S) has a closed form, so L_o(delta*(S), S) can be
# differentiated by finite differences and compared with the implicit gradient.
L2 = 0.5


def _ridge_inner(w, support, ctx):
  x, y = support['images'], support['labels']
  return 0.5 * jnp.sum((x @ w - y) ** 2) / x.shape[0] + 0.5 * L2 * jnp.sum(w ** 2)


def _ridge_outer(w, support, log_temp, ctx):
  # Depends on S directly too (a shift by the support mean), so the direct gradient is nonzero.
  logits = (ctx['x_target'] @ w + 0.1 * jnp.mean(support['images'])) * jnp.exp(log_temp)
  return rcig.cross_entropy(logits, ctx['y_target'])


def _ridge_solution(support):
  x, y = support['images'], support['labels']
  n, d = x.shape
  return jnp.linalg.solve(x.T @ x / n + L2 * jnp.eye(d), x.T @ y / n)


def _ridge_problem(seed):
  """(support, ctx) of a small random ridge-regression inner problem."""
  rng = np.random.default_rng(seed)
  support = {'images': jnp.asarray(rng.normal(size=(5, 3))),
             'labels': jnp.asarray(rng.normal(size=(5, 2)))}
  ctx = {'x_target': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
         'y_target': jnp.asarray(rng.integers(0, 2, size=8))}
  return support, ctx


def test_implicit_gradient_matches_finite_differences():
  support, ctx = _ridge_problem(2)
  log_temp = jnp.float32(0.3)
  w_star = _ridge_solution(support)
  # The iterative inner solve reaches the same optimum.
  w_adam = rcig.inner_solve(_ridge_inner, support, ctx, jnp.zeros_like(w_star), 2000, 0.01)
  np.testing.assert_allclose(w_adam, w_star, atol=5e-3)
  meta = rcig.meta_gradient(_ridge_inner, _ridge_outer, w_star, support, log_temp, ctx,
                            hinv_steps=2000, hinv_lr=0.01, clip_implicit=False)

  def total(s):
    return float(_ridge_outer(_ridge_solution(s), s, log_temp, ctx)[0])

  eps = 1e-2
  for name in ('images', 'labels'):
    numeric = np.zeros(support[name].shape)
    for index in np.ndindex(*support[name].shape):
      hi = dict(support, **{name: support[name].at[index].add(eps)})
      lo = dict(support, **{name: support[name].at[index].add(-eps)})
      numeric[index] = (total(hi) - total(lo)) / (2 * eps)
    np.testing.assert_allclose(meta.support[name], numeric, atol=3e-3 * np.abs(numeric).max()
                               + 1e-4)
    assert np.abs(meta.implicit[name]).max() > 0.1 * np.abs(numeric).max()
  temp_numeric = (float(_ridge_outer(w_star, support, log_temp + eps, ctx)[0]) -
                  float(_ridge_outer(w_star, support, log_temp - eps, ctx)[0])) / (2 * eps)
  np.testing.assert_allclose(meta.log_temp, temp_numeric, rtol=1e-2)
  # Clipping bounds the implicit part by the direct part's norm, leaf by leaf.
  clipped = rcig.meta_gradient(_ridge_inner, _ridge_outer, w_star, support, log_temp, ctx,
                               hinv_steps=50, hinv_lr=0.05, clip_implicit=True)
  for name in ('images', 'labels'):
    implicit = np.asarray(clipped.support[name]) - np.asarray(clipped.direct[name])
    assert np.linalg.norm(implicit) <= np.linalg.norm(clipped.direct[name]) * (1 + 1e-5)


def test_a_non_finite_implicit_gradient_leaves_the_direct_one():
  support, ctx = _ridge_problem(3)

  def broken_inner(w, s, c):  # NaN curvature: sqrt of a negative number
    return _ridge_inner(w, s, c) + jnp.sum(jnp.sqrt(w - 1e3)) * jnp.mean(s['images'])

  meta = rcig.meta_gradient(broken_inner, _ridge_outer, _ridge_solution(support), support,
                            jnp.float32(0.0), ctx, hinv_steps=5, hinv_lr=0.1)
  assert not np.all(np.isfinite(meta.implicit['images']))
  for name in ('images', 'labels'):
    np.testing.assert_array_equal(meta.support[name], meta.direct[name])


# ----------------------------------------------------------------------------------------------
# The loop on a tiny separable 3-class dataset.

def _tiny_cfg(**kw):
  base = dict(width=8, depth=1, inner_steps=3, hinv_steps=3, target_batch=12, pool_size=2,
              max_pool_steps=4, pool_train_steps=2, lr_images=0.03, lr_labels=0.03,
              checkpoint_every=2, ema_decay=0.9, eval_width=8, eval_train_steps=20)
  base.update(kw)
  return rcig.RcigConfig(**base)


@pytest.fixture
def prepared(tiny_npz):
  from ntkdd.server import distill
  return distill.prepare_data(distill.DistillConfig(dataset=tiny_npz, data_dir='.'))


def test_rcig_steps_lower_the_outer_loss(prepared):
  from ntkdd.server import rcig_loop
  # One pool model that never trains much, and the whole train split as the target: the
  # outer loss then measures the support alone.
  cfg = _tiny_cfg(pool_size=1, max_pool_steps=1000, pool_lr=1e-7, target_batch=36)
  rng = np.random.default_rng(0)
  state, _ = rcig_loop.initial_state(cfg, prepared, 1, rng)
  losses = []
  for step in range(8):
    state, record = rcig_loop.rcig_step(cfg, state, prepared, rng, step)
    losses.append(record['loss'])
  assert np.mean(losses[-2:]) < losses[0]


def _read(out):
  with np.load(out / 'support.npz') as f:
    support = {k: f[k] for k in f.files}
  records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
  return support, records


def test_run_rcig_writes_the_run_directory_and_resumes_exactly(prepared, tmp_path):
  from ntkdd.server import rcig_loop
  cfg = _tiny_cfg()
  straight = tmp_path / 'straight'
  summary = rcig_loop.run_rcig(cfg, prepared, straight, ipc=1, steps=4, seed=5, eval_every=4)
  for name in ('support.npz', 'metrics.jsonl', 'checkpoint.npz', 'config.json', 'summary.json'):
    assert (straight / name).exists()
  support, records = _read(straight)
  assert support['images'].shape == (3, 8, 8, 1) and support['labels'].shape == (3, 3)
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) for r in records[1:])
  assert 0 <= records[-1]['test_accuracy'] <= 1 and summary['test_accuracy_after'] is not None
  # An in-process run publishes its status like KIP's: the final snapshot says it ended.
  snap = json.loads((straight / 'status.json').read_text())
  assert snap['phase'] == 'done' and snap['snapshot_final'] and snap['step'] == 4
  assert snap['algorithm'] == 'rcig' and snap['last_accuracy'] == records[-1]['test_accuracy']
  assert 'krr_test_accuracy' not in records[-1] and 'krr_test_accuracy_after' not in summary
  with pytest.raises(ValueError, match='already holds'):
    rcig_loop.run_rcig(cfg, prepared, straight, ipc=1, steps=4, seed=5)

  split = tmp_path / 'split'
  rcig_loop.run_rcig(cfg, prepared, split, ipc=1, steps=2, seed=5, eval_every=4)
  rcig_loop.run_rcig(cfg, prepared, split, ipc=1, steps=4, seed=5, eval_every=4, resume=True)
  resumed, resumed_records = _read(split)
  np.testing.assert_array_equal(resumed['images'], support['images'])
  np.testing.assert_array_equal(resumed['labels'], support['labels'])
  assert [r['loss'] for r in resumed_records] == [r['loss'] for r in records]
  with pytest.raises(ValueError, match='flag'):
    rcig_loop.run_rcig(_tiny_cfg(l2_rate=1e-3), prepared, split, ipc=1, steps=6, seed=5,
                       resume=True)
  # A cosine run resumes with its schedule, or extended (--steps sets the schedule's length,
  # as KIP's): from the checkpoint on, the longer schedule's factors.
  for name, (first, then) in {'same': (4, 4), 'longer': (4, 6)}.items():
    rcig_loop.run_rcig(_tiny_cfg(lr_decay_steps=first), prepared, tmp_path / name, ipc=1,
                       steps=2, seed=5)
    rcig_loop.run_rcig(_tiny_cfg(lr_decay_steps=then), prepared, tmp_path / name, ipc=1,
                       steps=then, seed=5, resume=True)
  straight_cosine = tmp_path / 'straight-cosine'
  rcig_loop.run_rcig(_tiny_cfg(lr_decay_steps=4), prepared, straight_cosine, ipc=1, steps=4,
                     seed=5)
  np.testing.assert_array_equal(_read(tmp_path / 'same')[0]['images'],
                                _read(straight_cosine)[0]['images'])
  assert _read(tmp_path / 'longer')[1][-1]['step'] == 6


def test_init_support_starts_rcig_from_a_saved_set(prepared, tmp_path, caplog):
  """--init-support with --rcig-init-log-temp: the first learned set is the file's images and
  labels and the given temperature, the EMA starts afresh; resume reads the checkpoint only.
  Without the flag the temperature saved with the set is the start's (0 where none is)."""
  from ntkdd.server import rcig_loop, run_data
  made = tmp_path / 'made'
  rcig_loop.run_rcig(_tiny_cfg(), prepared, made, ipc=1, steps=2, seed=5)
  saved, records = _read(made)
  assert not np.allclose(saved['labels'], saved['labels'].round(3))   # learned labels
  # support.npz keeps the temperature the run had reached (learned: moved from 0).
  assert saved['log_temp'] == np.float32(records[-1]['log_temp']) != 0
  state, _ = rcig_loop.initial_state(_tiny_cfg(init_support=str(made / 'support.npz')),
                                     prepared, 1, np.random.default_rng(0))
  assert state['learned']['log_temp'] == saved['log_temp']
  renamed = tmp_path / 'support.set'   # read as the set is, whatever the name ends in
  renamed.write_bytes((made / 'support.npz').read_bytes())
  state, _ = rcig_loop.initial_state(_tiny_cfg(init_support=str(renamed)), prepared, 1,
                                     np.random.default_rng(0))
  assert state['learned']['log_temp'] == saved['log_temp']
  older = tmp_path / 'older.npz'   # a set saved before the temperature was recorded
  np.savez(older, **{k: v for k, v in saved.items() if k != run_data.SUPPORT_LOG_TEMP})
  with caplog.at_level(logging.WARNING):
    state, _ = rcig_loop.initial_state(_tiny_cfg(init_support=str(older)), prepared, 1,
                                       np.random.default_rng(0))
  assert float(state['learned']['log_temp']) == 0.0
  assert 'records no log temperature' in caplog.text and '--rcig-init-log-temp' in caplog.text
  broken = tmp_path / 'broken.npz'
  np.savez(broken, **{**saved, run_data.SUPPORT_LOG_TEMP: np.float32(np.nan)})
  with pytest.raises(ValueError, match='not a temperature to start from'):
    rcig_loop.initial_state(_tiny_cfg(init_support=str(broken)), prepared, 1,
                            np.random.default_rng(0))
  state, _ = rcig_loop.initial_state(_tiny_cfg(init_support=str(broken), init_log_temp=0.5),
                                     prepared, 1, np.random.default_rng(0))
  assert float(state['learned']['log_temp']) == 0.5   # the flag wins; the file's is not read
  start = tmp_path / 'start.npz'
  np.savez(start, **saved)
  cfg = _tiny_cfg(init_support=str(start), init_log_temp=1.5)
  state, label_ids = rcig_loop.initial_state(cfg, prepared, 1, np.random.default_rng(0))
  np.testing.assert_array_equal(np.asarray(state['learned']['images']), saved['images'])
  np.testing.assert_array_equal(np.asarray(state['learned']['labels']), saved['labels'])
  np.testing.assert_array_equal(label_ids, saved['label_ids'])
  assert float(state['learned']['log_temp']) == 1.5 and not np.any(state['ema']['images'])
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  rcig_loop.run_rcig(cfg, prepared, straight, ipc=1, steps=4, seed=5)
  rcig_loop.run_rcig(cfg, prepared, split, ipc=1, steps=2, seed=5)
  start.unlink()
  rcig_loop.run_rcig(cfg, prepared, split, ipc=1, steps=4, seed=5, resume=True)
  np.testing.assert_array_equal(_read(split)[0]['images'], _read(straight)[0]['images'])
  with pytest.raises(ValueError, match='does not exist'):
    rcig_loop.run_rcig(cfg, prepared, tmp_path / 'gone', ipc=1, steps=2, seed=5)


def test_cosine_schedule_scales_every_support_update(prepared):
  """lr_decay_steps = N: the support's step at meta-step t is the constant-rate step times
  (1 + cos(pi t / N)) / 2 (from the same state and draws): equal bits at t = 0, half at N / 2,
  no move at N; a constant-rate run is unchanged by the option's existence."""
  from ntkdd.server import rcig_loop
  constant, cosine = _tiny_cfg(), _tiny_cfg(lr_decay_steps=4)
  assert [rcig_loop.lr_factor(constant, t) for t in (0, 2, 4)] == [1.0, 1.0, 1.0]
  assert [rcig_loop.lr_factor(cosine, t) for t in (0, 2, 4, 9)] == pytest.approx([1, 0.5, 0, 0])
  state, _ = rcig_loop.initial_state(constant, prepared, 1, np.random.default_rng(2))
  for t, factor in ((0, 1.0), (2, 0.5), (4, 0.0)):
    moved = {}
    for name, cfg in (('constant', constant), ('cosine', cosine)):
      rng = np.random.default_rng(9)
      new, _ = rcig_loop.rcig_step(cfg, state, prepared, rng, t)
      moved[name] = {k: np.asarray(new['learned'][k]) - np.asarray(state['learned'][k])
                     for k in ('images', 'labels', 'log_temp')}
    for k in moved['constant']:
      assert np.any(moved['constant'][k] != 0), k
      if factor == 1.0:
        np.testing.assert_array_equal(moved['cosine'][k], moved['constant'][k])
      else:
        np.testing.assert_allclose(moved['cosine'][k], factor * moved['constant'][k],
                                   rtol=1e-4, atol=1e-7)


def test_tuned_inner_solve_never_raises_the_inner_loss():
  support = {'images': jnp.eye(3), 'labels': jnp.zeros((3, 1))}
  near_optimum = jnp.full((3, 1), 1e-4)  # the optimum for zero labels is 0: Adam overshoots
  delta, lr = rcig.tuned_inner_solve(_ridge_inner, support, {}, near_optimum, 5, 0.1)
  np.testing.assert_array_equal(delta, near_optimum)
  assert lr == pytest.approx(0.05)
  support['labels'] = jnp.ones((3, 1))
  delta, lr = rcig.tuned_inner_solve(_ridge_inner, support, {}, near_optimum, 5, 0.1)
  assert _ridge_inner(delta, support, {}) < _ridge_inner(near_optimum, support, {})
  assert lr == pytest.approx(0.11)


def test_flipped_support_is_the_doubled_support():
  """flip_support uses each support image and its mirror: the same losses, and gradients
  that sum over both copies, as an explicitly doubled support without flips."""
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  base = dict(width=8, depth=1)
  flipped = rcig.RcigConfig(**base, flip_support=True)
  plain = rcig.RcigConfig(**base)
  params = rcig.init_model(plain, jax.random.PRNGKey(0), (8, 8, 3), 4)
  ctx = {'params0': params[0], 'readout0': params[1], 'x_target': images[:2],
         'y_target': jnp.array([0, 1])}
  delta = jax.tree_util.tree_map(lambda p: 0.01 * jnp.ones_like(p), params[0])
  inner_f, outer_f = rcig.make_losses(flipped)
  inner_p, outer_p = rcig.make_losses(plain)

  def doubled(s):
    return {'images': jnp.concatenate([s['images'], s['images'][:, :, ::-1]]),
            'labels': jnp.concatenate([s['labels'], s['labels']])}

  support = {'images': images, 'labels': labels}
  np.testing.assert_allclose(inner_f(delta, support, ctx), inner_p(delta, doubled(support), ctx),
                             rtol=1e-5)
  np.testing.assert_allclose(outer_f(delta, support, 0.5, ctx)[0],
                             outer_p(delta, doubled(support), 0.5, ctx)[0], rtol=1e-5)
  g_f = jax.grad(lambda s: inner_f(delta, s, ctx))(support)['images']
  g_p = jax.grad(lambda s: inner_p(delta, doubled(s), ctx))(support)['images']
  np.testing.assert_allclose(g_f, g_p, rtol=1e-4, atol=1e-6)
  assert not np.allclose(inner_f(delta, support, ctx), inner_p(delta, support, ctx))


def test_batch_norm_option_normalises_and_trains():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(5, 8, 8, 4)), jnp.float32)
  layer = rcig.BatchNorm()
  _, params = layer.init_fn(jax.random.PRNGKey(0), x.shape)
  y = layer.apply_fn(params, x)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1, atol=1e-3)
  cfg = rcig.RcigConfig(width=8, depth=1, batch_norm=True, inner_steps=2, hinv_steps=2)
  params = rcig.init_model(cfg, jax.random.PRNGKey(1), (8, 8, 3), 3)
  assert len(jax.tree_util.tree_leaves(params)) > len(jax.tree_util.tree_leaves(
      rcig.init_model(rcig.RcigConfig(width=8, depth=1), jax.random.PRNGKey(1), (8, 8, 3), 3)))
  support = {'images': jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32),
             'labels': jnp.eye(3, dtype=jnp.float32) - 1 / 3}
  meta, _ = rcig.rcig_step_gradients(cfg, params, support, jnp.float32(0.0),
                                     jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32),
                                     jnp.array([0, 1, 2, 0, 1, 2]), 1e-3)
  grad = np.asarray(meta.support['images'])
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  images = support['images']
  trained, _ = rcig.pool_train(cfg, params, rcig.adam_init(params), images, support['labels'], 2)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(trained))


def test_rcig_logs_the_krr_accuracy_of_its_kernel_backend(tiny_npz, tmp_path):
  """With kernel workers, each evaluation also logs the ConvNet-NTK KRR accuracy of the saved
  support set, on the finite net's test subset; the distillation itself is unchanged."""
  from run_helpers import metrics, run_rcig_inprocess, tiny_rcig_job
  from ntkdd.server import backend, distill, jobs
  job = tiny_rcig_job(tiny_npz, steps=2, eval_every=2)
  with_krr = run_rcig_inprocess(job, tmp_path / 'krr', workers=1)
  without = jobs.run(job, str(tmp_path / 'plain'), None, progress=False)
  got, plain = metrics(tmp_path / 'krr'), metrics(tmp_path / 'plain')
  assert [r['loss'] for r in got] == [r['loss'] for r in plain]
  assert [r.get('test_accuracy') for r in got] == [r.get('test_accuracy') for r in plain]
  assert [r['step'] for r in got if 'krr_test_accuracy' in r] == [0, 2]
  assert not any('krr_test_accuracy' in r for r in plain)
  assert 'krr_test_accuracy_after' not in without
  # The last one, recomputed directly with the ConvNet kernel on the saved support.
  with np.load(tmp_path / 'krr' / 'support.npz') as f:
    images, labels = f['images'], f['labels']
  prepared = distill.prepare_data(job.settings)
  direct = distill.krr_test_accuracy(backend.InProcessKernels(job.architecture()), prepared,
                                     images, labels, job.settings)
  assert job.architecture().name == 'convnet'
  assert abs(direct - got[-1]['krr_test_accuracy']) <= 1 / 12 + 1e-9   # at most one image
  assert with_krr['krr_test_accuracy_after'] == got[-1]['krr_test_accuracy']
  snap = json.loads((tmp_path / 'krr' / 'status.json').read_text())
  assert snap['last_krr_accuracy'] == got[-1]['krr_test_accuracy'] and snap['phase'] == 'done'
  config = json.loads((tmp_path / 'krr' / 'config.json').read_text())['flags']
  assert config['krr_kernel'] == 'ntk' and config['krr_arch']['name'] == 'convnet'
@pytest.mark.parametrize('options', [dict(depth=2), dict(flip_support=True),
                                     dict(batch_norm=True)])
def test_structured_step_equals_the_reference_step(options):
  """The structured step (linearised body, J and J^T, the target batch in chunks) computes the
  reference's meta-gradient to float rounding, for an inner solve that is kept (lr 1e-3) and
  one that is discarded (lr 10: Adam overshoots, the inner loss rises)."""
  cfg = rcig.RcigConfig(**dict(dict(width=8, depth=1, inner_steps=4, hinv_steps=4), **options))
  rng = np.random.default_rng(11)
  shape = (8, 8, 3)
  params = rcig.init_model(cfg, jax.random.PRNGKey(4), shape, 4)
  support = {'images': jnp.asarray(rng.normal(size=(4,) + shape), jnp.float32),
             'labels': jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
  # More target images than one chunk of the structured step's target linearisation, and
  # not a multiple of it: its J and J^T run chunk by chunk.
  targets = 2 * rcig.TARGET_CHUNK + 5
  x_target = jnp.asarray(rng.normal(size=(targets,) + shape), jnp.float32)
  y_target = jnp.asarray(rng.integers(0, 4, size=targets))
  for inner_lr, next_lr in ((1e-3, 1.1e-3), (10.0, 5.0)):
    reference, reference_lr = rcig.rcig_step_gradients(cfg, params, support, jnp.float32(0.2),
                                                       x_target, y_target, inner_lr)
    fast, fast_lr = rcig.structured_step_gradients(cfg, params, support, jnp.float32(0.2),
                                                   x_target, y_target, inner_lr)
    assert reference_lr == fast_lr == pytest.approx(next_lr)
    for name in rcig.MetaGradient._fields:
      for a, b in zip(jax.tree_util.tree_leaves(getattr(reference, name)),
                      jax.tree_util.tree_leaves(getattr(fast, name))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(np.abs(a).max(), 1e-3),
                                   err_msg=name)
    assert np.abs(np.asarray(fast.implicit['images'])).max() > 0


def test_structured_loop_step_equals_the_reference_loop_step(prepared):
  """rcig_loop.rcig_step with the structured meta-gradient and fused pool steps follows the
  reference from one state and random generator: the same draws, the same support, pool model
  and inner learning rate to float rounding."""
  from ntkdd.server import rcig_loop
  cfg = _tiny_cfg()
  rng = np.random.default_rng(3)
  state, _ = rcig_loop.initial_state(cfg, prepared, 1, rng)
  for step in range(2):
    rng_fast = np.random.default_rng()
    rng_fast.bit_generator.state = rng.bit_generator.state
    fast, fast_record = rcig_loop.rcig_step(cfg, state, prepared, rng_fast, step)
    state, record = rcig_loop.rcig_step(cfg, state, prepared, rng, step, structured=False)
    assert fast_record['pool_model'] == record['pool_model']
    assert fast_record['loss'] == pytest.approx(record['loss'], rel=1e-5)
    assert float(fast['inner_lr']) == float(state['inner_lr'])
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(fast)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert rng_fast.bit_generator.state == rng.bit_generator.state


def test_structured_steps_compile_once(prepared):
  """Every jitted phase of the structured step is traced once for a run: not again in later
  steps, for another pool model, a re-initialised one or a new inner learning rate."""
  from ntkdd.server import rcig_loop
  cfg = _tiny_cfg(pool_size=2, max_pool_steps=2, pool_train_steps=2)
  rng = np.random.default_rng(8)
  state, _ = rcig_loop.initial_state(cfg, prepared, 1, rng)
  phases = rcig._structured_phases(rcig._network_key(cfg), cfg.l2_rate, cfg.flip_support)
  pool_step = rcig._pool_step(rcig._network_key(cfg), prepared.num_classes)
  jitted = dict(phases, pool_step=pool_step)
  # Other tests may have compiled these (cached) functions for other shapes already: count
  # the compiles this run adds after its first step.
  state, record = rcig_loop.rcig_step(cfg, state, prepared, rng, 0)
  after_first = {name: fn._cache_size() for name, fn in jitted.items()}
  assert all(size >= 1 for size in after_first.values()), after_first
  rates = {record['inner_lr']}
  for step in range(1, 6):
    state, record = rcig_loop.rcig_step(cfg, state, prepared, rng, step)
    rates.add(record['inner_lr'])
  assert len(rates) > 1
  for name, fn in jitted.items():
    assert fn._cache_size() == after_first[name], name


def test_adam_update_is_adam_to_float_rounding():
  """rcig.adam_update (optax's Adam, in RCIG's (mu, nu, count) state layout) takes the steps
  of Adam's formula (default b1, b2, eps, bias-corrected), over several steps and both leaves."""
  rng = np.random.default_rng(12)
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  state = rcig.adam_init(params)
  assert int(state.count) == 0 and not np.any(np.asarray(state.mu['w']))
  expected = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in expected.items()}
  nu = {k: np.zeros_like(v) for k, v in expected.items()}
  lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
  for step in range(1, 6):
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    params, state = rcig.adam_update(grads, state, params, lr)
    for k in expected:
      g = np.asarray(grads[k], np.float64)
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g * g
      expected[k] -= lr * (mu[k] / (1 - b1 ** step)) / (np.sqrt(nu[k] / (1 - b2 ** step)) + eps)
      np.testing.assert_allclose(params[k], expected[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.nu[k], nu[k], rtol=1e-5)
    assert int(state.count) == step and params['w'].dtype == jnp.float32
