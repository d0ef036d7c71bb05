"""The coordinator program: runs a distillation over kernel worker handles, whatever launched them.

`Coordinator` is the process body every distributed launch type runs (a Courier node under
Launchpad, an actor under Ray, or a plain object in a test): it waits until each worker answers
(`wait_for_workers`, through `WorkerHandle.wait_ready`), records the workers' pids
(worker_pids.json), runs `jobs.run` (KIP/LS: `distill.distill`; RCIG: `rcig_loop.run_rcig`,
the workers serving its KRR evaluation) over a `DistributedKernels` of the handles, serves
`status()` (JSON bytes) while it runs, publishes status in the run directory (status.sock,
status.json), and writes coordinator_result.json (ok / error / interrupted) when it ends. It
imports nothing of Courier or Ray: the launcher hands it the worker handles and a stop hook
(called last, e.g. to stop a Courier server and the Launchpad program).

The launcher's side: `open_run_dir` before starting the program, `read_result` and
`summary_of` after it ends; `CoordinatorFailed` when it ended without finishing the run.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ntkdd.server import checkpoint, run_dir as run_dir_lib, status as status_lib
from ntkdd.workers import protocol

# What a previous coordinator of a run directory leaves that must not pass for this run's.
STALE_FILES = (run_dir_lib.COORDINATOR_RESULT, run_dir_lib.WORKER_PIDS)
ROLE = 'coordinator'


class CoordinatorFailed(RuntimeError):
  """The coordinator ended without finishing the run; the message says why."""


def open_run_dir(run_dir: Union[str, Path], resume: bool,
                 stale_files: Sequence[str] = STALE_FILES) -> Path:
  """The run directory, resolved and made if need be, before a coordinator starts there.

  Args:
    run_dir: the run directory.
    resume: whether the run continues from its checkpoint.
    stale_files: files a previous coordinator left (its result, its worker pids, the launch
      type's address file), removed so that none is mistaken for this run's.

  Returns:
    The resolved run directory.

  Raises:
    ValueError: it already holds a run and `resume` is False (`checkpoint.check_run_dir`).
  """
  run_dir = Path(run_dir).resolve()
  checkpoint.check_run_dir(run_dir, resume)
  run_dir.mkdir(parents=True, exist_ok=True)
  for name in stale_files:
    (run_dir / name).unlink(missing_ok=True)
  return run_dir


def read_result(run_dir: Union[str, Path]) -> Optional[dict]:
  """The coordinator's coordinator_result.json as a dict; None while there is none."""
  return run_dir_lib.read_json(Path(run_dir) / run_dir_lib.COORDINATOR_RESULT)   # atomic


def summary_of(result: dict) -> dict:
  """The run's summary from a coordinator's result.

  Raises:
    distill.Interrupted: the run was stopped (it checkpointed; --resume continues it).
    CoordinatorFailed: the coordinator failed; the message holds its error and traceback.
  """
  from ntkdd.server import distill
  if result.get('ok'):
    return result['summary']
  if result.get('interrupted'):
    raise distill.Interrupted(result.get('error') or 'Interrupted.')
  raise CoordinatorFailed(f"The coordinator failed: {result.get('error')}\n"
                          f"{result.get('traceback') or ''}")


def wait_for_workers(handles: Sequence[protocol.WorkerHandle], timeout_s: float) -> list[dict]:
  """Waits until every worker answers ping, all within `timeout_s`; their decoded answers.

  Raises:
    CoordinatorFailed: a worker did not answer in time or failed to start (which one, why).
  """
  deadline = time.monotonic() + timeout_s
  answers = []
  for i, handle in enumerate(handles):
    try:
      answers.append(protocol.decode(handle.wait_ready(max(deadline - time.monotonic(), 0.0))))
    except TimeoutError as e:
      raise CoordinatorFailed(f'Kernel worker {i} ({handle.name}) did not answer ping within '
                              f'{timeout_s:g} s of the coordinator starting: {e}') from e
    except Exception as e:  # the worker died starting up, or answered garbage
      raise CoordinatorFailed(f'Kernel worker {i} ({handle.name}) failed to start: '
                              f'{type(e).__name__}: {e}') from e
  return answers


class Coordinator:
  """Runs one distillation over kernel worker handles and serves its status meanwhile.

  Args:
    config: the run as `jobs.to_dict(cfg)` (a KIP/LS `DistillConfig` or an RCIG `RcigJob`).
    run_dir: the run directory (shared with the launching process).
    resume: continue the run from its checkpoint.npz.
    worker_handles: one `protocol.WorkerHandle` per kernel worker.
    block: rows and columns of a kernel block (`DistributedKernels`; None: fitted per call).
    deadline_s: a worker call taking longer marks the worker down (`DistributedKernels`).
    startup_timeout_s: how long all workers together may take to answer their first ping.
    coordinator_kwargs: further `DistributedKernels` options (plan, broadcast, faults).
    stop_hook: called once when `run()` ends, after the result is written (a launcher's
      clean-up: stop its RPC server, end its program).
  """

  def __init__(self, config: dict, run_dir: str, resume: bool,
               worker_handles: Sequence[protocol.WorkerHandle], block: Optional[int] = 64,
               deadline_s: float = 600.0, startup_timeout_s: float = 300.0,
               coordinator_kwargs: Optional[dict] = None,
               stop_hook: Optional[Callable[[], None]] = None):
    self._config = dict(config)
    self._run_dir = Path(run_dir)
    self._resume = bool(resume)
    self._handles = list(worker_handles)
    self._block = None if block is None else int(block)
    self._deadline_s = float(deadline_s)
    self._startup_timeout_s = float(startup_timeout_s)
    self._coordinator_kwargs = dict(coordinator_kwargs or {})
    self._stop_hook = stop_hook
    self._started = threading.Event()
    self._status = status_lib.RunStatus(str(self._run_dir),
                                        total_steps=status_lib.total_steps(config))
    self._status.set_extra(coordinator_pid=os.getpid(), workers_expected=len(self._handles))

  def set_address(self, address: str) -> None:
    """Records where `status()` answers over RPC (HOST:PORT): status and coordinator_address.txt."""
    self._status.set_extra(address=address)
    self._run_dir.mkdir(parents=True, exist_ok=True)
    run_dir_lib.write_text(self._run_dir / run_dir_lib.COORDINATOR_ADDRESS_FILE, address + '\n')
    logging.info('Coordinator status RPC at %s.', address)

  # -- RPC methods (bytes out). -----------------------------------------------------------------

  def ping(self) -> bytes:
    return json.dumps({'ok': True, 'pid': os.getpid(), 'role': ROLE}).encode()

  def status(self) -> bytes:
    """The run's status snapshot as JSON bytes (see server/status.py)."""
    return self._status.to_bytes()

  # -- The run. -------------------------------------------------------------------------------

  def run(self) -> None:
    """Waits for the workers, runs the distillation, writes coordinator_result.json; runs once.

    Every outcome (done, interrupted, failed) is recorded in coordinator_result.json and in status;
    nothing is raised but a second call's RuntimeError.
    """
    if self._started.is_set():
      raise RuntimeError('Coordinator.run() runs once per coordinator.')
    self._started.set()
    from ntkdd.server import distill, distributed_kernels, jobs
    result: dict = {'ok': False, 'pid': os.getpid()}
    # Status for this machine without the network (an RPC port may live in a private
    # namespace): status.sock and status.json in the run directory.
    self._run_dir.mkdir(parents=True, exist_ok=True)
    publisher = status_lib.StatusPublisher(self._status, str(self._run_dir)).start()
    ended_by: Optional[BaseException] = None
    try:
      # A stale result of a killed run.
      (self._run_dir / run_dir_lib.COORDINATOR_RESULT).unlink(missing_ok=True)
      cfg = jobs.from_dict(self._config)
      answers = wait_for_workers(self._handles, self._startup_timeout_s)
      pids = {str(i): a.get('pid') for i, a in enumerate(answers)}
      run_dir_lib.write_json(self._run_dir / run_dir_lib.WORKER_PIDS,
                            {'coordinator': os.getpid(), 'workers': pids})
      self._status.set_extra(worker_pids=pids)
      self._status.set_phase('running')

      backends = []

      def factory(arch):
        backend = distributed_kernels.DistributedKernels(
            self._handles, block=self._block, deadline_s=self._deadline_s, dtype=cfg.dtype,
            **self._coordinator_kwargs)
        self._status.attach_backend(backend)
        backends.append(backend)
        return backend

      # KIP/LS or RCIG: the loops of the in-process path (server/jobs.py).
      summary = jobs.run(cfg, str(self._run_dir), factory, resume=self._resume,
                         progress=False, run_status=self._status)
      # The backend's totals (blocks, bytes, index blocks, faults) for the record.
      result.update(ok=True, summary=summary, backend=backends[-1].status() if backends else None)
      self._status.set_phase('done')
    except distill.Interrupted as e:
      ended_by = e
      result.update(interrupted=True, error=str(e))
      self._status.set_phase('interrupted', str(e))
    except BaseException as e:  # reported through the run directory, then the node ends
      ended_by = e
      result.update(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
      self._status.set_phase('failed', result['error'])
      logging.exception('Coordinator failed.')
    finally:
      try:
        run_dir_lib.write_json(self._run_dir / run_dir_lib.COORDINATOR_RESULT, result)
        publisher.finish(ended_by)
      finally:
        if self._stop_hook is not None:
          self._stop_hook()
