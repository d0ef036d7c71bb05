"""`make demo` on a bare machine: MNIST downloaded (or refused, or named when offline), reruns.

The Makefile's own demo recipe runs, with the installed `ntkdd` (this Python), tiny flags and
tiny idx files; `-o .venv/.installed` keeps make from building a virtual environment.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_data import http_server, write_idx_set  # noqa: F401  (a loopback server, idx files)

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO_FLAGS = ('--algorithm kip --ipc 1 --steps 2 --target-batch 10 --eval-every 1 '
                   '--checkpoint-every 1 --no-progress')

pytestmark = pytest.mark.skipif(shutil.which('make') is None, reason='needs make')


def tiny_mnist_arrays():
  rng = np.random.default_rng(0)
  y_train = np.repeat(np.arange(10), 2).astype(np.uint8)
  y_test = np.arange(10, dtype=np.uint8)
  return (rng.integers(0, 256, (20, 6, 6), dtype=np.uint8), y_train,
          rng.integers(0, 256, (10, 6, 6), dtype=np.uint8), y_test)


def make_demo(tmp_path, data_dir, download_url=''):
  env = dict(os.environ, NTKDD_CACHE=str(tmp_path / 'cache'))
  env.pop('NTKDD_DOWNLOAD_URL', None)
  command = ['make', '--no-print-directory', '-o', '.venv/.installed', 'demo',
             f'NTKDD={sys.executable} -m ntkdd.launch.cli', f'DATA_DIR={data_dir}',
             f'DEMO_DIR={tmp_path / "runs" / "demo"}', f'DEMO_FLAGS={TINY_DEMO_FLAGS}',
             f'DOWNLOAD_URL={download_url}']
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=env)


def test_demo_twice_starts_then_continues_its_run(tmp_path):
  write_idx_set(tmp_path / 'data' / 'mnist', tiny_mnist_arrays())
  first = make_demo(tmp_path, tmp_path / 'data')
  assert first.returncode == 0, first.stdout + first.stderr
  assert 'make demo: starting a new demo run' in first.stdout
  assert 'KIP mnist ipc=1: KRR test accuracy' in first.stdout
  run_dir = tmp_path / 'runs' / 'demo'
  assert (run_dir / 'checkpoint.npz').exists() and (run_dir / 'support.npz').exists()
  second = make_demo(tmp_path, tmp_path / 'data')
  assert second.returncode == 0, second.stdout + second.stderr
  assert 'holds an earlier demo run: continuing it (--resume)' in second.stdout
  assert 'Resuming at step 2 of 2' in second.stderr
  assert 'KIP mnist ipc=1: KRR test accuracy' in second.stdout


def test_demo_offline_stops_with_one_message_naming_the_files(tmp_path):
  (tmp_path / 'empty').mkdir()
  done = make_demo(tmp_path, tmp_path / 'empty', download_url='http://127.0.0.1:1/')
  assert done.returncode != 0
  errors = [line for line in done.stderr.splitlines() if 'ntkdd distill: error' in line]
  assert len(errors) == 1, done.stderr
  for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
               't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
    assert name in errors[0]
  assert f'put them in {tmp_path / "empty" / "mnist"}' in errors[0]
  assert 'Traceback' not in done.stderr


def test_demo_refuses_a_mirror_whose_files_are_not_the_official_ones(tmp_path, http_server):
  served, url = http_server
  write_idx_set(served, tiny_mnist_arrays())   # a mirror with other files than MNIST's
  done = make_demo(tmp_path, tmp_path / 'data', download_url=url)
  assert done.returncode != 0
  assert 'md5 digest mismatch: expected f68b3c2dcbeaaa9fbdd348bbdeb94873' in done.stderr
  assert (tmp_path / 'data' / 'mnist' / 'train-images-idx3-ubyte.gz.rejected').exists()
  assert not (tmp_path / 'data' / 'mnist' / 'train-images-idx3-ubyte.gz').exists()
