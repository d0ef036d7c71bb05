"""`make bench-gpu SMOKE=1`: every part of the GPU suite at tiny sizes on this CPU, same JSON keys
(and the opt-in rcig_mnist part, which a device call asks for by name).

Runs the suite's script as a user does (parts in their own processes, each with its limit) and
checks the JSON and the Markdown table; the numbers themselves are a CPU's and tiny-sized.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / 'bench' / 'gpu_suite.py'


def load_suite():
  return load_bench('gpu_suite')


@pytest.fixture(scope='module')
def smoke_report(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_suite') / 'gpu_suite.json'
  parts = ','.join(load_suite().PARTS)
  done = subprocess.run([sys.executable, str(SUITE), '--smoke', '--parts', parts, '--out',
                         str(out)], cwd=REPO, capture_output=True, text=True, timeout=500)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(out.read_text()), out, done


def test_smoke_runs_every_part_and_writes_the_same_keys(smoke_report):
  report, out, done = smoke_report
  suite = load_suite()
  assert report['smoke'] is True and report['suite'] == 'gpu_suite'
  assert set(report) == {'suite', 'smoke', 'created', 'wall_s', 'command', 'settings',
                         'limits_s', 'kip_seconds', 'environment', 'parts'}
  assert list(report['parts']) == list(suite.PARTS)
  for name, part in report['parts'].items():
    assert part['status'] == 'ok', (name, part.get('error'), part.get('log_tail'))
    assert part['wall_s'] <= part['limit_s'] + 5
    assert set(part['result']) == set(suite.PART_KEYS[name]), name
  env = report['environment']
  assert env['backend'] == 'cpu' and env['peak_fp32_flops'] == 'unknown'
  assert env['jax'] and env['python']
  kernel = report['parts']['kernel']['result']
  for size, entry in kernel['sizes'].items():
    assert set(entry) == set(suite.KERNEL_SIZE_KEYS), size
    for call in ('auto_forward', 'auto_vjp', 'largest_forward', 'largest_vjp'):
      assert entry[call]['pairs_per_s'] > 0 and entry[call]['achieved_flops'] > 0, call
      assert entry[call]['percent_of_peak'] is None   # a CPU: no table peak
    assert entry['largest_tile'] == 4 and entry['sweep_stopped'] == 'max_tile'
  ls, kip = report['parts']['ls']['result'], report['parts']['kip']['result']
  assert 0 <= ls['krr_test_accuracy'] <= 1 and ls['paper_accuracy'] == 0.536
  assert ls['support'] == 10 and ls['targets'] == 40 and ls['test_images'] == 20
  assert kip['steps'] >= 1 and 0 <= kip['krr_test_accuracy'] <= 1
  assert report['parts']['rcig']['result']['steps'] >= 1
  table = out.with_suffix('.md').read_text()
  assert '| kernel | ok |' in table and 'LS ConvNet CIFAR-10' in table
  assert table in done.stdout


def test_rcig_mnist_times_a_first_stretch_then_resumes_to_a_planned_length(smoke_report):
  report, out, _ = smoke_report
  quality = report['parts']['rcig_mnist']['result']
  # The first stretch ran past its first (compiling) step; the plan added steps at its pace,
  # and the resumed run's cosine has that length.
  assert quality['first_stretch_steps'] >= 4
  assert quality['steps'] > quality['first_stretch_steps']
  assert quality['planned_steps'] >= quality['steps']
  config = json.loads((out.parent / 'rcig_mnist_config.json').read_text())
  assert config['flags']['lr_decay_steps'] == quality['planned_steps']
  assert config['flags']['init_support'].endswith('rcig-mnist-1ipc-warm-b1024/support.npz')
  metrics = [json.loads(line) for line in
             (out.parent / 'rcig_mnist_metrics.jsonl').read_text().splitlines()]
  assert metrics[-1]['step'] == quality['steps']
  rows = json.loads((out.parent / 'rcig_mnist_evaluation.json').read_text())['rows']
  assert rows[0]['mean'] == quality['test_accuracy'] and rows[0]['test_images'] == 20
  assert sorted(quality['files']) == sorted(p.name for p in out.parent.glob('rcig_mnist_*'))


def test_rcig_mnist_is_not_a_default_part():
  suite = load_suite()
  assert suite.parse_args([]).parts.split(',') == list(suite.DEFAULT_PARTS)
  assert 'rcig_mnist' in suite.PARTS and 'rcig_mnist' not in suite.DEFAULT_PARTS


def test_rcig_mnist_plans_its_length_from_the_timed_steps():
  suite = load_suite()
  # Step 1 compiles (10 s); steps 2-6 take 0.5 s each: 40 s left at 95% -> 76 more steps.
  walls = {0: 0.0, 1: 10.0, 2: 10.5, 3: 11.0, 4: 11.5, 5: 12.0, 6: 12.5}
  assert suite.rcig_mnist_steps(6, walls, 40.0) == 6 + 76
  assert suite.rcig_mnist_steps(6, walls, -3.0) == 6      # no time left: ends where it is
  assert suite.rcig_mnist_steps(1, {0: 0.0, 1: 10.0}, 40.0) == 1   # nothing timed yet


def test_a_part_past_its_limit_is_recorded_as_a_timeout(tmp_path):
  suite = load_suite()
  spec = {'smoke': True, 'data_dir': str(tmp_path), 'work_dir': str(tmp_path),
          'settings': suite.settings(True), 'kip_seconds': 1.0,
          'smoke_data': suite.write_smoke_data(tmp_path)}
  record = suite.launch_part('rcig', spec, limit_s=3)   # imports JAX and compiles: > 3 s
  assert record['status'] == 'timeout' and 'limit of 3 s' in record['error']
  assert record['wall_s'] < 30


def test_peak_table_by_device_name():
  suite = load_suite()
  assert suite.peak_fp32_flops('NVIDIA H200') == 67e12
  assert suite.peak_fp32_flops('NVIDIA H100 PCIe') == 51.2e12
  assert suite.peak_fp32_flops('NVIDIA H100 80GB HBM3') == 67e12
  assert suite.peak_fp32_flops('cpu') is None
