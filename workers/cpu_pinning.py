"""Pinning a worker process to one CPU core (`--pin-workers`), all of its threads.

Why: on a CPU host every kernel worker's XLA runtime starts a thread pool as wide as the CPUs
it may run on, so N unpinned workers on N cores run N x N compute threads that preempt each
other. A worker pinned to its own core, before its first JAX computation, gets a one-thread
pool and the core to itself (what `taskset -a -cp CORE PID` does after the fact, without the
oversized pool). Linux only: elsewhere `os.sched_setaffinity` does not exist and pinning is
refused with an error.
"""
from __future__ import annotations

import os


def core_for(index: int, allowed: set[int]) -> int:
  """The core that worker `index` takes among the `allowed` ones: the (index mod n)-th lowest.

  Args:
    index: the worker's index (0, 1, ...).
    allowed: the cores the process may run on (`os.sched_getaffinity(0)`).

  Returns:
    One core of `allowed`; workers 0..n-1 get n different cores.
  """
  if not allowed:
    raise ValueError('No CPU core is allowed to this process.')
  cores = sorted(allowed)
  return cores[index % len(cores)]


def thread_ids() -> list[int]:
  """The kernel thread ids of this process (/proc/self/task)."""
  return sorted(int(name) for name in os.listdir('/proc/self/task'))


def pin_process(index: int) -> int:
  """Pins every thread of this process to worker `index`'s core (see `core_for`).

  Threads started later inherit the core from the thread that starts them.

  Args:
    index: the worker's index.

  Returns:
    The core pinned to.

  Raises:
    OSError: this platform cannot set CPU affinity (not Linux).
  """
  if not hasattr(os, 'sched_setaffinity'):
    raise OSError('--pin-workers needs Linux (os.sched_setaffinity); run without it here.')
  core = core_for(index, os.sched_getaffinity(0))
  for tid in thread_ids():
    try:
      os.sched_setaffinity(tid, {core})
    except ProcessLookupError:   # the thread ended meanwhile
      pass
  return core
