"""Progress of long work: loops (a tqdm bar, or sparse log lines), kernel computations, durations.

`ProgressBar` draws a loop's progress; `KernelProgress` reports a long kernel computation's
pairs, rate and ETA to the run's status and to the log. tqdm is optional (`pip install tqdm`,
in ntkdd[progress] and ntkdd[dev]): without it, or when the stream is not a terminal (CI logs,
files), the loop prints a full line now and then.
"""
from __future__ import annotations

import contextvars
import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

BAR_WIDTH = 24
# The tqdm line: description, bar, steps, rate, ETA, then loss/accuracy (tqdm adds ', ').
TQDM_FORMAT = ('{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt}  {rate_fmt}  '
               'ETA {remaining}{postfix}')
LOG_EVERY_FRACTION = 0.1   # not a TTY: a line each time another tenth of the work is done ...
LOG_EVERY_SECONDS = 30.0   # ... or when this long has passed since the last line


def finite_or_none(value: Any) -> Optional[float]:
  """`value` as a float, or None where it is missing, not a number, NaN or infinite."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def format_duration(seconds: Optional[float], clock: bool = False) -> str:
  """A duration for people: '42.5s', '2m05s', '3h07m'; unknown (None, NaN) as '-'.

  Args:
    seconds: the duration; negative counts as 0.
    clock: tqdm's form instead: 'mm:ss', or 'h:mm:ss' from one hour on, and '--:--' when
      unknown or negative (the progress bar's ETA and time taken, as tqdm shows them).
  """
  seconds = finite_or_none(seconds)
  if clock:
    if seconds is None or seconds < 0:
      return '--:--'
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes:02d}:{secs:02d}'
  if seconds is None:
    return '-'
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f'{seconds:.1f}s'
  if seconds < 3600:
    return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'
  return f'{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m'


def format_rate(steps_per_second: Optional[float]) -> str:
  """'12.3 it/s'; slow loops read better as '4.56 s/it'."""
  if not steps_per_second or not math.isfinite(steps_per_second):
    return '? it/s'
  if steps_per_second >= 100:
    return f'{steps_per_second:.0f} it/s'
  if steps_per_second >= 1:
    return f'{steps_per_second:.3g} it/s'
  return f'{1 / steps_per_second:.3g} s/it'


def is_accuracy_name(name: str) -> bool:
  lowered = name.lower()
  return lowered in ('acc', 'accuracy') or lowered.endswith(('_acc', 'accuracy'))


def format_field(name: str, value: Any) -> str:
  """name=value, compactly: floats to 4 significant digits, accuracies (fractions) as percent."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return f'{name}={value}'
  if isinstance(value, int):
    return f'{name}={value}'
  if is_accuracy_name(name) and 0.0 <= value <= 1.0:
    return f'{name}={100 * value:.2f}%'
  return f'{name}={value:.4g}'


# -- Progress of long kernel computations. ------------------------------------------------------

# The status holder (a `status.RunStatus`) that kernel computations of this context report to
# (set by `status.published`).
KERNEL_PROGRESS_HOLDER: contextvars.ContextVar = contextvars.ContextVar(
    'ntkdd_kernel_progress_holder', default=None)
KERNEL_LOG_EVERY_S = 30.0


def progress_text(state: dict) -> str:
  """'kernel: 1,234/5,678 pairs (21.7%), 95 pairs/s, ETA 46.7s'."""
  done, total = state.get('pairs_done') or 0, state.get('pairs_total') or 0
  percent = f' ({100 * done / total:.1f}%)' if total else ''
  rate = finite_or_none(state.get('pairs_per_second'))
  return (f"{state.get('what', 'kernel')}: {done:,}/{total:,} pairs{percent}, "
          f"{'-' if rate is None else format(rate, ',.0f')} pairs/s, "
          f"ETA {format_duration(state.get('eta_s'))}")


class KernelProgress:
  """Progress of one kernel computation: pairs done of total, rate and ETA.

  Each update goes to the run's status (field `field`, while it lasts: `kernel_progress` for
  one kernel call, `run_progress` for a whole run counted in kernel pairs, as Label Solve's)
  when a `status.RunStatus` (`holder`: anything with `update(**fields)`) is given or set in
  KERNEL_PROGRESS_HOLDER, and a log line goes out every
  `log_every_s` seconds, terminal or not; a computation shorter than that logs nothing.
  Thread-safe: the coordinator's worker threads report blocks as they arrive.
  """

  def __init__(self, what: str, pairs_total: int, holder: Any = None,
               log_every_s: float = KERNEL_LOG_EVERY_S, clock=time.monotonic,
               field: str = 'kernel_progress'):
    self.what, self.pairs_total, self.field = what, int(pairs_total), field
    self.holder = holder if holder is not None else KERNEL_PROGRESS_HOLDER.get()
    self.log_every_s, self._clock = float(log_every_s), clock
    self.pairs_done = 0
    self._start = self._last_log = clock()
    self._logged = False
    self._lock = threading.Lock()

  def add(self, pairs: int) -> None:
    self.update(self.pairs_done + int(pairs))

  def update(self, pairs_done: int) -> None:
    with self._lock:
      self.pairs_done = max(self.pairs_done, int(pairs_done))
      now = self._clock()
      state = self._state(now)
      log = now - self._last_log >= self.log_every_s
      if log:
        self._last_log, self._logged = now, True
    if self.holder is not None:
      self.holder.update(**{self.field: state})
    if log:
      logging.info('%s', progress_text(state))

  def _state(self, now: float) -> dict:
    elapsed = now - self._start
    rate = self.pairs_done / elapsed if elapsed > 0 and self.pairs_done else None
    left = max(0, self.pairs_total - self.pairs_done)
    return {'what': self.what, 'pairs_done': self.pairs_done, 'pairs_total': self.pairs_total,
            'pairs_per_second': rate, 'eta_s': left / rate if rate else None,
            'elapsed_s': elapsed}

  def close(self) -> None:
    """The end: a last log line if any was logged, and the status field cleared."""
    if self._logged:
      logging.info('%s (done)', progress_text(self._state(self._clock())))
    if self.holder is not None:
      self.holder.update(**{self.field: None})


class PairsReported:
  """A kernel backend whose `kernel` calls also advance `progress` (a `KernelProgress`) by the
  pairs they computed; everything else is the wrapped backend's."""

  def __init__(self, backend: Any, progress: KernelProgress):
    self._backend, self._progress = backend, progress

  def kernel(self, x1, x2=None) -> dict:
    out = self._backend.kernel(x1, x2)
    self._progress.add(len(x1) * (len(x1) if x2 is None else len(x2)))
    return out

  def __getattr__(self, name: str) -> Any:
    return getattr(self._backend, name)


class ProgressBar:
  """`desc [#####.....] step/total  rate  ETA mm:ss  loss=… acc=…`.

  On a terminal, with tqdm installed, a tqdm bar redrawn in place (at most every
  `min_interval` seconds) carries the same fields; elsewhere (CI logs, files, or no tqdm) a
  full line is printed at most every tenth of the work or every 30 s. `initial` is the step a
  resumed run starts from: rate and ETA count only the steps done since.
  """

  def __init__(self, total: int, desc: str = '', stream: Optional[TextIO] = None,
               min_interval: float = 0.2, initial: int = 0,
               clock: Callable[[], float] = time.monotonic) -> None:
    self.total = max(0, int(total))
    self.desc = desc
    self.stream = stream if stream is not None else sys.stderr
    self.min_interval = min_interval
    self.initial = int(initial)
    self.step = int(initial)
    self.fields: dict[str, Any] = {}
    self._clock = clock
    self._start = clock()
    self._first_update: Optional[tuple[int, float]] = None  # (step, time): warm-up excluded
    self._tqdm = _make_tqdm(self) if _stream_is_tty(self.stream) else None
    self._last_draw: Optional[float] = None
    self._next_log_step = self._milestone_after(self.step)
    self._drawn_step: Optional[int] = None
    self._closed = False

  @property
  def uses_tqdm(self) -> bool:
    """True when a tqdm bar draws on a terminal (else plain lines)."""
    return self._tqdm is not None

  # -- public -------------------------------------------------------------------------------

  def update(self, step: int, **fields: Any) -> None:
    """Records that `step` steps are done; `fields` (None values ignored) join the line."""
    self.step = int(step)
    now = self._clock()
    if self._first_update is None:
      self._first_update = (self.step, now)
    self.fields.update({name: value for name, value in fields.items() if value is not None})
    if self._tqdm is not None:
      self._tqdm.set_postfix_str(self._fields_text(), refresh=False)
      self._tqdm.update(self.step - self._tqdm.n)
    elif self._should_log(now):
      self._print_line(now)

  def close(self) -> None:
    """Ends the bar (terminal) or prints the final state if it was not printed yet."""
    if self._closed:
      return
    self._closed = True
    if self._tqdm is not None:
      self._tqdm.close()
    elif self._drawn_step != self.step:
      self._print_line(self._clock())
    self.stream.flush()

  def __enter__(self) -> 'ProgressBar':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def rate(self, now: Optional[float] = None) -> Optional[float]:
    """Steps per second, counting only new (not resumed) steps: measured from the first
    update once there are steps after it (so compilation before it does not count), else
    from the bar's start."""
    now = self._clock() if now is None else now
    since_step, since_time = self.initial, self._start
    if self._first_update is not None and self.step > self._first_update[0]:
      since_step, since_time = self._first_update
    new_steps, elapsed = self.step - since_step, now - since_time
    if new_steps <= 0 or elapsed <= 0:
      return None
    return new_steps / elapsed

  def line(self, now: Optional[float] = None) -> str:
    """The text of the plain log line as it stands."""
    now = self._clock() if now is None else now
    rate = self.rate(now)
    if self._done():
      timing = f'in {format_duration(now - self._start, clock=True)}'
    else:
      eta = (self.total - self.step) / rate if rate else None
      timing = f'ETA {format_duration(eta, clock=True)}'
    parts = [f'{self.desc} ' if self.desc else '',
             f'[{self._bar()}] {self.step}/{self.total}  {format_rate(rate)}  {timing}']
    if self.fields:
      parts.append('  ' + self._fields_text())
    return ''.join(parts)

  # -- drawing ------------------------------------------------------------------------------

  def _fields_text(self) -> str:
    return ' '.join(format_field(k, v) for k, v in self.fields.items())

  def _done(self) -> bool:
    return self.step >= self.total

  def _bar(self) -> str:
    fraction = 1.0 if self.total == 0 else min(1.0, max(0.0, self.step / self.total))
    filled = int(round(fraction * BAR_WIDTH))
    return '#' * filled + '.' * (BAR_WIDTH - filled)

  def _milestone_after(self, step: int) -> int:
    """The next step that completes another tenth of the total."""
    if self.total == 0:
      return 0
    tenth = self.total * LOG_EVERY_FRACTION
    return int(math.floor(step / tenth + 1e-9) + 1) * tenth if tenth else step + 1

  def _should_log(self, now: float) -> bool:
    if self._drawn_step == self.step:
      return False
    return (self._last_draw is None or self.step >= self._next_log_step or self._done()
            or now - self._last_draw >= LOG_EVERY_SECONDS)

  def _print_line(self, now: float) -> None:
    self.stream.write(self.line(now) + '\n')
    self.stream.flush()
    self._last_draw = now
    self._drawn_step = self.step
    self._next_log_step = self._milestone_after(self.step)


def _make_tqdm(bar: ProgressBar):
  """A tqdm bar on the bar's stream, or None without tqdm (then plain lines)."""
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return tqdm(total=bar.total, initial=bar.initial, desc=bar.desc, file=bar.stream,
              mininterval=bar.min_interval, bar_format=TQDM_FORMAT, dynamic_ncols=True,
              leave=True)


def _stream_is_tty(stream: TextIO) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False
