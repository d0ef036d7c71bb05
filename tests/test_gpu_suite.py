"""`make bench-gpu SMOKE=1`: every part of the GPU suite at tiny sizes on this CPU, same JSON keys.

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
  done = subprocess.run([sys.executable, str(SUITE), '--smoke', '--out', str(out)], cwd=REPO,
                        capture_output=True, text=True, timeout=400)
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
