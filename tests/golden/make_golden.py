"""Writes the fixed-seed golden runs that tests/test_fixed_seed_golden.py compares bitwise.

Run it only when a change is *meant* to move the numbers (and say so in the commit):
  .venv/bin/python tests/golden/make_golden.py
It writes, next to itself, `tiny_rgb.npz` (the data), `golden.npz` (each case's support set and
per-step losses after its full run, and the CPU platform it ran on) and `old_runs/<case>/`
(each case's run directory stopped part-way, the way an older checkout left it, for the
resume-across-versions check), and removes the other platforms' files, which no longer match.

The last bits of a run depend on the CPU (BLAS kernels and XLA's vector code differ between
vendors, vector widths and microarchitectures), so each platform the tests run on keeps its
own record, made from the same code as golden.npz:
  .venv/bin/python tests/golden/make_golden.py --platform
writes `golden-<vendor>-<isa>-<family>.<model>.npz` for this machine's CPU (`cpu_model_key`):
its full runs and its resumes of the stored old_runs, leaving golden.npz and old_runs as they
are. Records named by vendor and ISA alone (`platform_key`, the older scheme) still serve the
CPUs without a record of their own model.
"""
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import make_tiny_npz  # pylint: disable=wrong-import-position

DATA = HERE / 'tiny_rgb.npz'
REFERENCE = HERE / 'golden.npz'
# The platform golden.npz was recorded on before it recorded one (an AVX-512 Xeon).
LEGACY_PLATFORM = 'GenuineIntel-avx512f'
PLATFORM_ENTRY = '_platform'     # golden.npz's entry naming its platform
RESUMED = 'resumed'              # a platform file's prefix for its resumes of old_runs


def _cpuinfo() -> str:
  path = Path('/proc/cpuinfo')
  return path.read_text() if path.exists() else ''


def platform_key(cpuinfo: str = None) -> str:
  """The CPU family a run's rounding depends on: the vendor and the widest vector ISA.

  Args:
    cpuinfo: /proc/cpuinfo's text (read if None; on systems without it the machine name).
  """
  cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
  vendor = re.search(r'^vendor_id\s*:\s*(\S+)', cpuinfo, re.M)
  flags = re.search(r'^flags\s*:(.*)$', cpuinfo, re.M)
  flags = set(flags.group(1).split()) if flags else set()
  isa = next((f for f in ('avx512f', 'avx2', 'avx') if f in flags), 'base')
  import platform  # pylint: disable=import-outside-toplevel
  return f'{vendor.group(1) if vendor else platform.machine()}-{isa}'


def cpu_model_key(cpuinfo: str = None) -> str:
  """`platform_key` narrowed to the CPU's family and model (/proc/cpuinfo's `cpu family` and
  `model`): two AMD EPYC hosts with AVX-512 (this workplace's machines vary) round differently
  where XLA compiles for each one's microarchitecture.

  Args:
    cpuinfo: /proc/cpuinfo's text (read if None).
  """
  cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
  family = re.search(r'^cpu family\s*:\s*(\d+)', cpuinfo, re.M)
  model = re.search(r'^model\s*:\s*(\d+)', cpuinfo, re.M)
  if not (family and model):
    return platform_key(cpuinfo)
  return f'{platform_key(cpuinfo)}-{family.group(1)}.{model.group(1)}'


def platform_file(key: str) -> Path:
  """Where the golden runs of platform `key` live, other than the reference's."""
  return HERE / f'golden-{key}.npz'

# name -> (flags without --out/--steps, total steps, steps of the stored part-way run or None)
CASES = {
    'kip_fc': (['--algorithm', 'kip', '--arch', 'fc', '--depth', '2', '--ipc', '2',
                '--target-batch', '12', '--lr', '0.05', '--learn-labels', '--eval-every', '3'],
               6, 3),
    # A schedule over the whole run: a part-way run would be a different run, so no old_runs.
    'kip_fc_cosine': (['--algorithm', 'kip', '--arch', 'fc', '--depth', '1', '--ipc', '2',
                       '--target-batch', '12', '--lr', '0.05', '--lr-schedule', 'cosine',
                       '--eval-every', '5'], 5, None),
    # Recorded when `auto` meant standardisation for every kernel (the ConvNet's is the channel
    # ZCA now); the flag names it, and its old run (config 'auto') resumes under it.
    'kip_conv_workers': (['--algorithm', 'kip', '--arch', 'convnet', '--depth', '1', '--ipc', '1',
                          '--target-batch', '9', '--lr', '0.02', '--learn-labels',
                          '--eval-every', '2', '--workers', '2', '--block', '4',
                          '--preprocess', 'standardize'], 4, 2),
    'ls_fc': (['--algorithm', 'ls', '--arch', 'fc', '--depth', '2', '--ipc', '2'], None, None),
    'rcig': (['--algorithm', 'rcig', '--ipc', '1', '--depth', '1', '--width', '8',
              '--pool-size', '2', '--inner-steps', '2', '--hinv-steps', '2',
              '--rcig-target-batch', '12', '--eval-every', '2', '--eval-test-size', '12'], 4, 2),
}
COMMON = ['--data-dir', '.', '--no-progress', '--seed', '3']


def argv(case: str, data: Path, out: Path, steps=None, resume: bool = False) -> list:
  """The `ntkdd distill` command line of one golden case (`data` relative to the working dir)."""
  flags, total, _ = CASES[case]
  line = ['distill', '--dataset', str(data), *COMMON, *flags, '--out', str(out)]
  if total is not None:
    line += ['--steps', str(total if steps is None else steps), '--checkpoint-every', '1']
  return line + (['--resume'] if resume else [])


def _one_cpu() -> None:
  # XLA:CPU splits a convolution's reductions by the threads it may use, so the rounding of a
  # run depends on how many CPUs it sees: the golden runs see one, wherever they run.
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run_cli(argv_: list, cwd: Path) -> int:
  """`ntkdd` with `argv_` in a fresh interpreter on one CPU, as a user runs it: process-wide JAX
  state that other code in a test process may have set (a float64 kernel turns on
  jax_enable_x64) would move RCIG's rounding, and so would the number of CPUs."""
  import subprocess  # pylint: disable=import-outside-toplevel
  code = 'import sys; from ntkdd.launch import cli; sys.exit(cli.main(sys.argv[1:]))'
  return subprocess.run([sys.executable, '-c', code, *map(str, argv_)], cwd=cwd, check=False,
                        preexec_fn=_one_cpu).returncode


def run_record(run_dir: Path) -> dict:
  """What is compared bitwise: the support set and every logged loss and accuracy."""
  import json  # pylint: disable=import-outside-toplevel
  record = {}
  with np.load(run_dir / 'support.npz') as f:
    for key in ('images', 'labels'):
      record[key] = f[key]
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  for key in ('loss', 'test_accuracy', 'target_accuracy'):
    values = [r.get(key) for r in rows]
    record[key] = np.array([np.nan if v is None else v for v in values], np.float64)
  record['steps'] = np.array([r['step'] for r in rows], np.int64)
  return record


def record_platform() -> Path:
  """This platform's golden runs (full runs, and resumes of the stored old_runs) from the
  current code, beside golden.npz; returns the file written."""
  arrays = {}
  with tempfile.TemporaryDirectory() as tmp:
    for case, (_, _, part) in CASES.items():
      out = Path(tmp) / case
      assert run_cli(argv(case, Path(DATA.name), out), HERE) == 0, case
      arrays.update({f'{case}/{k}': v for k, v in run_record(out).items()})
      if part is not None:
        resumed = Path(tmp) / f'{case}-resumed'
        shutil.copytree(HERE / 'old_runs' / case, resumed)
        assert run_cli(argv(case, Path(DATA.name), resumed, resume=True), HERE) == 0, case
        arrays.update({f'{RESUMED}/{case}/{k}': v for k, v in run_record(resumed).items()})
  path = platform_file(cpu_model_key())
  np.savez(path, **arrays)
  print(f'wrote {path} ({len(arrays)} arrays)')
  return path


def main() -> None:
  if sys.argv[1:] == ['--platform']:
    record_platform()
    return
  # The data is named relative to the run's working directory (HERE), as users do.
  make_tiny_npz(DATA, classes=3, per_class=12, test_per_class=6, side=8, channels=3, seed=7)
  arrays = {PLATFORM_ENTRY: np.array(platform_key())}
  old_runs = HERE / 'old_runs'
  shutil.rmtree(old_runs, ignore_errors=True)
  with tempfile.TemporaryDirectory() as tmp:
    for case, (_, _, part) in CASES.items():
      out = Path(tmp) / case
      assert run_cli(argv(case, Path(DATA.name), out), HERE) == 0, case
      for key, value in run_record(out).items():
        arrays[f'{case}/{key}'] = value
      if part is not None:
        assert run_cli(argv(case, Path(DATA.name), old_runs / case, steps=part), HERE) == 0, case
        for extra in ('support.png', 'curves.png', 'status.sock'):
          (old_runs / case / extra).unlink(missing_ok=True)
  np.savez(REFERENCE, **arrays)
  for stale in HERE.glob('golden-*.npz'):   # recorded from the code before this change
    stale.unlink()
  print(f'wrote {REFERENCE} ({len(arrays)} arrays) and {old_runs}; record the other platforms '
        f'the tests run on with --platform there')


if __name__ == '__main__':
  main()
