"""bench/kip_vs_nt.py without neural-tangents: ntkdd's backend end to end on a tiny dataset, and the bisection."""
import json

from conftest import load_bench


def test_first_step_reaching_bisects_back_to_the_first_crossing():
  bench = load_bench('kip_vs_nt')
  accuracies = {s: min(1.0, 0.1 * s) for s in range(11)}   # 0.1 per step
  asked = []

  def accuracy_at(step):
    asked.append(step)
    return accuracies[step]

  curve = {0: 0.0, 5: 0.5, 10: 1.0}
  assert bench.first_step_reaching(curve, 0.7, accuracy_at) == 7
  assert set(asked) <= set(range(6, 10))
  assert bench.first_step_reaching(curve, 0.0, accuracy_at) == 0
  assert bench.first_step_reaching(curve, 1.1, accuracy_at) is None
  assert bench.evaluated_steps(7, 3) == [0, 3, 6, 7]


def test_ntkdd_backend_runs_within_its_budget_and_writes_its_curve(tiny_npz, tmp_path):
  bench = load_bench('kip_vs_nt')
  out = tmp_path / 'kip_vs_nt.json'
  results = bench.main(['--dataset', tiny_npz, '--data-dir', str(tmp_path), '--cache-dir',
                        str(tmp_path / 'cache'), '--backends', 'ntkdd', '--depth', '1',
                        '--target-batch', '6', '--steps', '3', '--budget-s', '600',
                        '--eval-every', '2', '--json', str(out),
                        '--runs-dir', str(tmp_path / 'runs')])
  saved = json.loads(out.read_text())
  assert saved['runs'] == json.loads(json.dumps(results['runs']))
  (run,) = saved['runs']
  assert run['backend'] == 'ntkdd' and run['steps_done'] == 3   # the schedule ends first
  assert [p['step'] for p in run['curve']] == [0, 2, 3]
  assert [s['step'] for s in run['steps']] == [0, 1, 2, 3]
  assert run['steps'][-1]['wall_s'] == run['step_wall_s'] > 0
  assert all(0 <= p['test_accuracy'] <= 1 and p['eval_s'] > 0 for p in run['curve'])
  assert saved['comparison'] is None and saved['test_images'] == 18
  assert saved['checks'] == {'same_initial_support': True, 'same_target_batches': True}

  # Started again with the same --runs-dir, it evaluates the kept run instead of running it.
  kept = (tmp_path / 'runs' / 'ntkdd-run.npz').stat().st_mtime_ns
  again = bench.main(['--dataset', tiny_npz, '--data-dir', str(tmp_path), '--cache-dir',
                      str(tmp_path / 'cache'), '--backends', 'ntkdd', '--depth', '1',
                      '--target-batch', '6', '--steps', '3', '--budget-s', '600',
                      '--eval-every', '2', '--runs-dir', str(tmp_path / 'runs')])
  assert (tmp_path / 'runs' / 'ntkdd-run.npz').stat().st_mtime_ns == kept
  assert [p['test_accuracy'] for p in again['runs'][0]['curve']] == [
      p['test_accuracy'] for p in run['curve']]
  assert again['runs'][0]['step_wall_s'] == run['step_wall_s']
  # ... and reads the evaluations the first process kept, instead of computing them again.
  assert (tmp_path / 'runs' / 'evaluations.json').exists()
  assert [p['eval_s'] for p in again['runs'][0]['curve']] == [p['eval_s'] for p in run['curve']]


class _FakeEvaluator:
  """compare()'s view of an Evaluator: runs, points and a memoised accuracy(name, step)."""

  def __init__(self, accuracies: dict, walls: dict):
    self.runs = {name: {'step': list(range(len(walls[name]))), 'wall_s': walls[name]}
                 for name in walls}
    self.table, self.points, self.asked = accuracies, {name: {} for name in walls}, []

  def accuracy(self, name, step):
    self.asked.append((name, step))
    self.points[name][step] = (self.table[name][step], 1.0)
    return self.table[name][step]


def _evaluated_at_0_6_12(ours: list) -> _FakeEvaluator:
  """nt: 4 steps of 10 s to 0.7; ours: 12 steps of 1 s, evaluated at steps 0, 6 and 12."""
  fake = _FakeEvaluator({'nt': [0.1, 0.3, 0.5, 0.6, 0.7], 'ntkdd': ours},
                        {'nt': [0.0, 10.0, 20.0, 30.0, 40.0],
                         'ntkdd': [float(s) for s in range(13)]})
  for step in (0, 6, 12):
    fake.accuracy('ntkdd', step)
  return fake


def test_compare_looks_at_ours_after_as_many_steps_as_nt_took():
  bench = load_bench('kip_vs_nt')
  # nt took 4 steps; ours' curve dips after step 4 (not monotonic), so the --eval-every
  # points 0, 6, 12 alone would put the first crossing between 6 and 12.
  fake = _evaluated_at_0_6_12([0.1, 0.3, 0.5, 0.65, 0.72, 0.66, 0.6, 0.62, 0.68, 0.71, 0.73,
                               0.75, 0.8])
  result = bench.compare(fake)
  assert result['nt_final_accuracy'] == 0.7 and result['nt_wall_s'] == 40.0
  assert result['ours_step_reaching'] == 4 and result['ours_s_to_nt_final'] == 4.0
  assert result['ratio'] == 0.1 and result['goal_met']
  assert ('ntkdd', 4) in fake.asked


def test_compare_without_bisection_gives_an_upper_bound():
  bench = load_bench('kip_vs_nt')
  fake = _evaluated_at_0_6_12([0.1, 0.3, 0.5, 0.65, 0.68, 0.66, 0.6, 0.62, 0.68, 0.71, 0.73,
                               0.75, 0.8])
  result = bench.compare(fake, bisect=False)
  assert result['ours_step_reaching'] == 12 and not result['exact']
  assert result['ours_below_at'] == 6 and result['goal_met'] is None   # 12 s > 4 s: unknown
  assert set(fake.asked) == {('nt', 4), ('ntkdd', 0), ('ntkdd', 4), ('ntkdd', 6), ('ntkdd', 12)}


def test_compare_against_an_earlier_nt_row_evaluates_ours_at_the_goal_time():
  bench = load_bench('kip_vs_nt')
  # nt's row from an earlier results file: 4 steps, 40 s, 0.7. Ours over Launchpad: 12 steps
  # of 1 s; its last step within 1/10 of nt's time (step 4) is evaluated whatever
  # --eval-every chose, and the bisection starts from there.
  fake = _FakeEvaluator({'ntkdd-launchpad': [0.1, 0.3, 0.5, 0.71, 0.72, 0.66, 0.6, 0.62, 0.68,
                                             0.71, 0.73, 0.75, 0.8]},
                        {'ntkdd-launchpad': [0.0] + [float(s) for s in range(1, 13)]})
  for step in (0, 12):   # --eval-every 12
    fake.accuracy('ntkdd-launchpad', step)
  reference = {'steps_done': 4, 'final_test_accuracy': 0.7, 'step_wall_s': 40.0,
               'source': 'earlier.json'}
  assert bench.compare(fake, ours='ntkdd-launchpad') is None     # no nt and no reference
  result = bench.compare(fake, ours='ntkdd-launchpad', reference=reference)
  assert result['nt_source'] == 'earlier.json' and result['ours'] == 'ntkdd-launchpad'
  assert result['ours_step_reaching'] == 3 and result['exact'] and result['goal_met']
  assert ('ntkdd-launchpad', 4) in fake.asked and ('nt', 4) not in fake.asked


def test_reference_json_must_hold_the_same_configuration(tmp_path):
  bench = load_bench('kip_vs_nt')
  args = bench.parse_args(['--backends', 'ntkdd-launchpad', '--reference-json', 'x.json'])
  config = {k: getattr(args, k) for k in ('dataset', 'ipc', 'depth', 'image_size', 'preprocess',
                                          'target_batch', 'lr', 'lr_schedule', 'steps',
                                          'learn_labels', 'reg', 'seed', 'test_size')}
  nt_row = {'backend': 'nt', 'steps_done': 7, 'final_test_accuracy': 0.759,
            'step_wall_s': 1369.1, 'steps': [{'step': 0, 'target_accuracy': None},
                                             {'step': 1, 'target_accuracy': 0.51}]}
  path = tmp_path / 'earlier.json'
  path.write_text(json.dumps({'config': config, 'runs': [nt_row], 'created': 'then'}))
  row = bench.reference_run(str(path), args)
  assert row['final_test_accuracy'] == 0.759 and row['source'] == str(path)
  assert bench.agreement_with_reference({'step': [0, 1, 2], 'target_accuracy': [0, 0.51, 0.4]},
                                        row) == {'reference_steps_compared': 1,
                                                 'reference_steps_equal_target_accuracy': 1}
  path.write_text(json.dumps({'config': dict(config, lr=0.04), 'runs': [nt_row]}))
  try:
    bench.reference_run(str(path), args)
  except ValueError as e:
    assert 'lr' in str(e)
  else:
    raise AssertionError('a reference of another configuration was accepted')
  try:
    bench.parse_args(['--backends', 'nt', '--reference-json', 'x.json'])
  except SystemExit:
    pass
  else:
    raise AssertionError('--reference-json with backend nt was accepted')
