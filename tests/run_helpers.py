"""Helpers shared by the tests of the launch types: a tiny KIP run, its reference, checks."""
import json
import time
from pathlib import Path

import numpy as np

from ntkdd.launch import inprocess
from ntkdd.server import distill

BLOCK = 8          # 12 targets + 6 support images: several blocks per kernel call
TIMEOUT_S = 180    # per run; each test stays within about 3 minutes


def tiny_cfg(tiny_npz, **kw) -> distill.DistillConfig:
  base = dict(algorithm='kip', dataset=tiny_npz, data_dir='.', ipc=2, steps=4, arch='fc',
              depth=1, target_batch=12, eval_every=2, checkpoint_every=2, learning_rate=0.05,
              seed=3, dtype='float32')
  base.update(kw)
  return distill.DistillConfig(**base)


def run_inprocess(cfg, out):
  """The reference: the same run over two in-process workers with the same blocks."""
  return distill.distill(cfg, str(out),
                         lambda arch: inprocess.make_inprocess_backend(arch, workers=2,
                                                                       block=BLOCK),
                         progress=False)


def support(run_dir) -> dict:
  with np.load(Path(run_dir) / 'support.npz') as f:
    return {k: f[k] for k in f.files}


def assert_same_support(a, b) -> None:
  sa, sb = support(a), support(b)
  np.testing.assert_allclose(sa['images'], sb['images'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sa['labels'], sb['labels'], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(sa['label_ids'], sb['label_ids'])


def steps(run_dir) -> list:
  return [json.loads(line)['step']
          for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]


def last_step(run_dir) -> int:
  try:
    return max(steps(run_dir), default=-1)
  except (OSError, ValueError, KeyError):
    return -1


def wait_for(predicate, timeout_s, what, running=None, poll_s=0.02, details=lambda: ''):
  """predicate()'s first true value; AssertionError on timeout or when running() turns false."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if running is not None and not running():
      raise AssertionError(f'The run ended while waiting for {what}.\n{details()}')
    time.sleep(poll_s)
  raise AssertionError(f'Timed out after {timeout_s} s waiting for {what}.')


def tiny_rcig_job(tiny_npz, **kw):
  """A tiny RCIG run (width 8, depth 1, 3-step solves, 20-step evaluation nets): seconds.

  Its KRR evaluation over kernel workers uses the ConvNet NTK at depth 1."""
  from ntkdd.common import rcig
  from ntkdd.server import jobs
  net = dict(width=8, depth=1, inner_steps=3, hinv_steps=3, target_batch=12, pool_size=2,
             max_pool_steps=4, pool_train_steps=2, lr_images=0.03, lr_labels=0.03,
             checkpoint_every=2, ema_decay=0.9, eval_width=8, eval_train_steps=20)
  settings = dict(algorithm='rcig', dataset=tiny_npz, data_dir='.', ipc=1, steps=4, arch='fc',
                  depth=1, eval_every=2, eval_test_size=12, seed=5, dtype='float32')
  for key, value in kw.items():
    (net if key in rcig.RcigConfig.__dataclass_fields__ else settings)[key] = value
  return jobs.RcigJob(distill.DistillConfig(**settings), rcig.RcigConfig(**net))


def run_rcig_inprocess(job, out, workers: int = 2):
  """The RCIG reference: the same run, its KRR evaluation over in-process workers."""
  from ntkdd.server import jobs
  return jobs.run(job, str(out),
                  lambda arch: inprocess.make_inprocess_backend(arch, workers=workers,
                                                                block=BLOCK),
                  progress=False)


def metrics(run_dir) -> list:
  return [json.loads(line)
          for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]


def kill_coordinator(program, run_dir, before_step: int, timeout_s: float) -> dict:
  """SIGKILLs a Launchpad program's coordinator by pid while its run is short of `before_step`,
  and checks that waiting for its result then fails; returns the program's processes record."""
  import os   # pylint: disable=import-outside-toplevel
  import signal   # pylint: disable=import-outside-toplevel
  import pytest   # pylint: disable=import-outside-toplevel
  from ntkdd.launch import launchpad_program   # pylint: disable=import-outside-toplevel
  info = json.loads(program.processes_file.read_text())
  os.kill(info['nodes']['coordinator'][0], signal.SIGKILL)
  assert last_step(run_dir) < before_step, (
      f'the run passed step {before_step} before the coordinator was killed')
  with pytest.raises(launchpad_program.CoordinatorFailed, match='without a result'):
    launchpad_program.wait_for_result(program, str(run_dir), timeout_s=timeout_s)
  return info
