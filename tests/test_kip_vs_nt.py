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
