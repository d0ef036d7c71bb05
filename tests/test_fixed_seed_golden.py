"""Fixed-seed KIP, LS and RCIG runs are bitwise equal to the recorded ones, and run directories
written by an older checkout still resume to the same bits.

Each run is an `ntkdd distill` process of its own, as a user runs it. The golden files come
from tests/golden/make_golden.py. A refactor must leave them untouched;
a change meant to move the numbers regenerates them and says so in its commit.

Bits are compared on the platform golden.npz was recorded on and on each CPU model or platform
with a record of its own (golden-<vendor>-<isa>[-<family>.<model>].npz, made from the same
code); on any other CPU the runs
are compared to golden.npz within a few float32 rounding steps, with a warning that names the
command recording this platform.
"""
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / 'golden'
sys.path.insert(0, str(GOLDEN_DIR))

import make_golden  # pylint: disable=wrong-import-position


# Off a recorded platform: |run - golden| <= this times the golden's largest magnitude (the
# last-bit differences seen between an Intel and an AMD CPU were <= 1.8e-7 of it).
OTHER_PLATFORM_TOLERANCE = 1e-5


class Golden(dict):
  """The golden arrays of this machine's platform; `exact` False where only golden.npz (another
  platform's record) is there to compare with."""
  exact = True


@pytest.fixture(scope='module')
def golden():
  key, model_key = make_golden.platform_key(), make_golden.cpu_model_key()
  with np.load(make_golden.REFERENCE) as f:
    reference = Golden(f)
  recorded_on = str(reference.pop(make_golden.PLATFORM_ENTRY, make_golden.LEGACY_PLATFORM))
  # This CPU model's own record first, then the reference where it was made on this platform,
  # then a record of the platform (vendor and ISA) made on another model.
  model_file = make_golden.platform_file(model_key)
  if model_file.exists():
    with np.load(model_file) as f:
      return Golden(f)
  if recorded_on == key:
    return reference
  path = make_golden.platform_file(key)
  if path.exists():
    with np.load(path) as f:
      return Golden(f)
  warnings.warn(f'No golden runs recorded for this CPU platform ({key}): comparing to '
                f'golden.npz within {OTHER_PLATFORM_TOLERANCE:g} of each array\'s scale. Record '
                f'it from unchanged code with: .venv/bin/python tests/golden/make_golden.py '
                f'--platform')
  reference.exact = False
  return reference


@pytest.fixture
def data(tmp_path):
  # A copy in another working directory (each run's cwd), named as the recorded runs name it.
  (tmp_path / 'data').mkdir()
  shutil.copy(make_golden.DATA, tmp_path / 'data' / make_golden.DATA.name)
  return Path(make_golden.DATA.name)


def _assert_bitwise(record: dict, golden: Golden, case: str, prefix: str = '') -> None:
  for key, value in record.items():
    expected = golden[f'{prefix}{case}/{key}']
    assert value.dtype == expected.dtype and value.shape == expected.shape, (case, key)
    if golden.exact or value.dtype.kind != 'f':
      np.testing.assert_array_equal(value, expected, err_msg=f'{case}: {key} moved')
    else:
      scale = np.nanmax(np.abs(expected)) if np.any(np.isfinite(expected)) else 0.0
      np.testing.assert_allclose(value, expected, rtol=0,
                                 atol=OTHER_PLATFORM_TOLERANCE * scale,
                                 err_msg=f'{case}: {key} moved beyond rounding')


def test_platform_key_names_vendor_and_vector_width():
  intel = 'vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 avx512f\n'
  amd = 'vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2\n'
  assert make_golden.platform_key(intel) == 'GenuineIntel-avx512f'
  assert make_golden.platform_key(amd) == 'AuthenticAMD-avx2'
  assert make_golden.platform_key(intel) == make_golden.LEGACY_PLATFORM
  genoa = 'vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: avx2 avx512f\n'
  assert make_golden.cpu_model_key(genoa) == 'AuthenticAMD-avx512f-25.17'
  assert make_golden.cpu_model_key(amd) == 'AuthenticAMD-avx2'   # no family: the platform's


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
  # A platform's own record holds its resumes of these (other-platform) run directories; on
  # golden.npz's platform they end where the full runs do.
  resumed = f'{make_golden.RESUMED}/' if f'{make_golden.RESUMED}/{case}/images' in golden else ''
  _assert_bitwise(make_golden.run_record(out), golden, case, resumed)


@pytest.mark.parametrize('path', sorted(GOLDEN_DIR.glob('golden-*.npz')), ids=lambda p: p.name)
def test_platform_records_differ_from_the_reference_by_rounding_only(path):
  """Each platform's record (same code as golden.npz) is within the tolerance used off the
  recorded platforms: the platforms differ in rounding, not in what the runs do."""
  with np.load(make_golden.REFERENCE) as f:
    reference = Golden(f)
  reference.exact = False
  with np.load(path) as f:
    record = dict(f)
  cases = {name.split('/')[-2] for name in record}
  assert cases == set(make_golden.CASES)
  for name, value in record.items():
    case, key = name.split('/')[-2:]   # after the 'resumed/' prefix, if any
    _assert_bitwise({key: value}, reference, case)
