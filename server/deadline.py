"""Calls with a deadline: a thread makes the call, and the caller stops waiting for it in time.

A call that may hang (an RPC to a dead peer, a cluster that went away) runs on a `Caller`
thread; the waiting side gives up after its deadline and leaves the call to finish alone (a
Python thread cannot be killed). One `Caller` can make many calls, one at a time, so that a
caller making thousands of calls does not start a thread for each (the distributed kernel
backend keeps one per worker slot); `call_with_deadline` is the one-call form.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional


class DeadlineExceeded(TimeoutError):
  """The call did not answer within its deadline (it may still be running)."""


class Caller:
  """A daemon thread that makes the calls given to `submit`, one at a time, in order."""

  def __init__(self, name: str = 'ntkdd-worker-call'):
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._loop, daemon=True, name=name).start()

  def submit(self, fn: Callable, args: tuple = ()) -> tuple[dict, threading.Event]:
    """Queues fn(*args); returns (box, done): once `done` is set, box holds 'answer' (what fn
    returned) or 'error' (what it raised)."""
    box, done = {}, threading.Event()
    self._jobs.put((fn, args, box, done))
    return box, done

  def stop(self) -> None:
    """The thread ends after the calls already queued (an abandoned one too, if it returns)."""
    self._jobs.put(None)

  def _loop(self) -> None:
    while True:
      job = self._jobs.get()
      if job is None:
        return
      fn, args, box, done = job
      try:
        box['answer'] = fn(*args)
      except BaseException as e:  # handed to whoever waits for the call
        box['error'] = e
      finally:
        done.set()


def call_with_deadline(fn: Callable, timeout_s: float, args: tuple = (),
                       name: str = 'ntkdd-call') -> Any:
  """fn(*args) on a thread of its own, waited for at most `timeout_s` seconds.

  Args:
    fn: the call; it runs on a daemon thread named `name`.
    timeout_s: how long to wait for its answer.
    args: its arguments.
    name: the thread's name (shown by debuggers and py-spy).

  Returns:
    What fn returned.

  Raises:
    DeadlineExceeded: no answer within `timeout_s` (the call is left running).
    Whatever fn raised, as it raised it.
  """
  caller = Caller(name)
  box, done = caller.submit(fn, args)
  caller.stop()
  if not done.wait(float(timeout_s)):
    raise DeadlineExceeded(f'no answer within {float(timeout_s):g} s')
  error: Optional[BaseException] = box.get('error')
  if error is not None:
    raise error
  return box['answer']
