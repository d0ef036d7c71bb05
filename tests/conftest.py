"""Shared fixtures: tiny datasets written in the standard formats; loading bench/ scripts."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
BENCH_DIR = Path(__file__).resolve().parents[1] / 'bench'


def load_bench(name: str):
  """The module of bench/<name>.py (bench/ is no package; its scripts import each other, so
  the folder goes on sys.path)."""
  spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
  spec.loader.exec_module(module)
  return module


def make_tiny_npz(path: Path, classes: int = 3, per_class: int = 12, test_per_class: int = 6,
                  side: int = 8, channels: int = 1, seed: int = 0) -> Path:
  """Classes are distinct blurred patterns plus noise, so kernels can learn them."""
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(0, 1, size=(classes, side, side, channels))

  def split(n):
    y = np.repeat(np.arange(classes), n)
    x = patterns[y] * 0.6 + rng.uniform(0, 0.4, size=(len(y), side, side, channels))
    return (x * 255).astype(np.uint8), y.astype(np.int64)

  x_train, y_train = split(per_class)
  x_test, y_test = split(test_per_class)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


@pytest.fixture
def tiny_npz(tmp_path):
  return str(make_tiny_npz(tmp_path / 'tiny.npz'))
