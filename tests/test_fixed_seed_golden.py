"""Fixed-seed KIP, LS and RCIG runs are bitwise equal to the recorded ones, and run directories
written by an older checkout still resume to the same bits.

Each run is an `ntkdd distill` process of its own, as a user runs it. The golden files come
from tests/golden/make_golden.py. A refactor must leave them untouched;
a change meant to move the numbers regenerates them and says so in its commit.
"""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / 'golden'
sys.path.insert(0, str(GOLDEN_DIR))

import make_golden  # pylint: disable=wrong-import-position


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_DIR / 'golden.npz') as f:
    return dict(f)


@pytest.fixture
def data(tmp_path):
  # A copy in another working directory (each run's cwd), named as the recorded runs name it.
  (tmp_path / 'data').mkdir()
  shutil.copy(make_golden.DATA, tmp_path / 'data' / make_golden.DATA.name)
  return Path(make_golden.DATA.name)


def _assert_bitwise(record: dict, golden: dict, case: str) -> None:
  for key, value in record.items():
    expected = golden[f'{case}/{key}']
    assert value.dtype == expected.dtype and value.shape == expected.shape, (case, key)
    np.testing.assert_array_equal(value, expected, err_msg=f'{case}: {key} moved')


@pytest.mark.parametrize('case', list(make_golden.CASES))
def test_fixed_seed_run_is_bitwise_golden(case, data, tmp_path, golden):
  out = tmp_path / case
  assert make_golden.run_cli(make_golden.argv(case, data, out), tmp_path / 'data') == 0
  _assert_bitwise(make_golden.run_record(out), golden, case)


@pytest.mark.parametrize('case', [c for c, (_, _, part) in make_golden.CASES.items() if part])
def test_old_run_directory_resumes_to_the_same_bits(case, data, tmp_path, golden):
  out = tmp_path / case
  shutil.copytree(GOLDEN_DIR / 'old_runs' / case, out)
  assert make_golden.run_cli(make_golden.argv(case, data, out, resume=True),
                              tmp_path / 'data') == 0
  _assert_bitwise(make_golden.run_record(out), golden, case)
