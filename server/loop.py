"""The run skeleton KIP, LS and RCIG plug their step into: run dir, resume, save, stop, summary."""
from __future__ import annotations

import dataclasses
import logging
import platform
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

from ntkdd.server import checkpoint, run_data
from ntkdd.server import run_dir as run_files

# A TensorBoard writer of a run: board(record, images or None, label_ids); board.close().
Board = Callable[[dict, Optional[np.ndarray], Any], None]


class Interrupted(RuntimeError):
  """The run stopped on SIGINT/SIGTERM after checkpointing; `--resume` continues it."""


class StopFlag:
  """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the end of the step.

  A second signal raises KeyboardInterrupt at once. Outside the main thread no handler is
  installed (the caller handles signals).
  """

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self) -> 'StopFlag':
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: the caller handles signals
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning('Signal %d: checkpointing after this step, then stopping.', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def versions() -> dict[str, str]:
  """The versions config.json records (ntkdd, jax, numpy, python)."""
  import jax  # pylint: disable=import-outside-toplevel
  import ntkdd  # pylint: disable=import-outside-toplevel
  return {'ntkdd': ntkdd.__version__, 'jax': jax.__version__, 'numpy': np.__version__,
          'python': platform.python_version()}


def nan_advice(step: int, last_checkpoint: int, run_dir: Path, lr_flag: str, lr: float) -> str:
  """The message of a run whose support set turned NaN/inf: what to do that works."""
  return (f'Step {step}: the support set or its kernel became NaN or inf; the learning rate '
          f'({lr_flag} {lr:g}) is probably too large for this data. The run in {run_dir} keeps '
          f'its last good checkpoint (step {last_checkpoint}). Run again with a smaller '
          f'{lr_flag} (e.g. {lr / 10:g}) or a larger --reg, into a new --out directory or with '
          f'--overwrite.')


def render_pictures(run_dir: Path) -> None:
  """support.png and curves.png of a finished run; a failure (no Pillow, an unexpected run) only
  warns: the pictures are a nicety, the run is done."""
  try:
    from ntkdd.server import report  # pylint: disable=import-outside-toplevel
    report.render_run(run_dir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Pictures skipped: %s', e)


def open_board(run_dir: Path, prepared: run_data.PreparedData) -> Board:
  """A `board(record, images, label_ids)` that writes TensorBoard events into `run_dir`: the
  record's scalars, and the grid of `images` (model space; None: none) when the record is an
  evaluation; `board.close()` ends the event file. Needs tensorboardX."""
  from ntkdd.server import tensorboard_log  # pylint: disable=import-outside-toplevel
  log = tensorboard_log.TensorBoardLog(run_dir)

  def board(record: dict, images: Optional[np.ndarray], label_ids) -> None:
    pixels = (prepared.preprocessor.inverse(np.asarray(images))
              if images is not None and tensorboard_log.is_evaluation(record) else None)
    log.log(record, pixels, label_ids, prepared.num_classes)

  board.close = log.close
  return board


def run_in_dir(run_dir: Path, flags: dict, resumable: tuple, prepared: run_data.PreparedData,
               body: Callable[[Optional[tuple], Optional[Board]], dict], *, resume: bool,
               overwrite: bool, arrays_needed: tuple, total_steps: Optional[int],
               run_status: Any = None, tensorboard: bool = False) -> dict[str, Any]:
  """Opens the run directory, writes config.json and runs `body(saved, board)` in it.

  Everything is checked (`checkpoint.open_run`: the directory, on resume the flags and the
  data's fingerprint) before the first file is written; a fresh run that fails before its
  first checkpoint leaves nothing behind.

  Args:
    run_dir: the run directory (--out).
    flags: the run's settings, saved in config.json and compared on resume.
    resumable: the flags that may differ on resume.
    prepared: the run's data (its record goes into config.json).
    body: runs the algorithm: `saved` is the checkpoint to resume from ((arrays, meta), or
      None for a fresh run), `board` the TensorBoard writer (None without --tensorboard).
    resume, overwrite: --resume, --overwrite.
    arrays_needed: checkpoint arrays a resume needs.
    total_steps: the run's steps, for its status.
    run_status: the caller's published `status.RunStatus` (Launchpad and Ray coordinators);
      None: the run publishes its own (status.sock, status.json).
    tensorboard: also write TensorBoard events.

  Returns:
    What `body` returns (the run's summary).
  """
  from ntkdd.server import status  # pylint: disable=import-outside-toplevel
  run_dir = Path(run_dir)
  record = run_data.dataset_record(prepared)
  made_dir = not run_dir.exists()
  saved = checkpoint.open_run(run_dir, flags, resumable, resume, dataset=record,
                              overwrite=overwrite, arrays_needed=arrays_needed)
  try:
    run_files.write_json(run_dir / run_files.CONFIG, {
        'command': 'distill', 'flags': flags, 'dataset': record, 'versions': versions(),
        'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')})
    # The run's status (the caller's, or published here), which long kernel computations (LS,
    # KRR evaluation) report their progress to; its final status.json says how the run ended.
    with status.published(run_status, run_dir, total_steps):
      board = open_board(run_dir, prepared) if tensorboard else None
      try:
        return body(saved, board)
      finally:
        if board:
          board.close()
  except BaseException:
    if saved is None:
      checkpoint.discard_failed_start(run_dir, made_dir,
                                      also=(run_files.STATUS_JSON, run_files.STATUS_SOCKET))
    raise


@dataclasses.dataclass
class LoopEnd:
  """Where a stepped run ended, for its summary.

  accuracy: the last accuracy the loop measured in this process (None if it measured none);
  before/best: the step-0 accuracy and the best one (None without evaluations); fresh: the
  run started here (no resume).
  """
  step: int
  elapsed: float
  before: Optional[float]
  best: Optional[dict]
  accuracy: Optional[float]
  fresh: bool


class Algorithm(Protocol):
  """What an algorithm plugs into `run_steps` (KIP: `distill.KipSteps`; RCIG:
  `rcig_loop.RcigSteps`). It holds the run's state between the calls."""
  name: str             # progress bar and log: 'KIP', 'RCIG'
  accuracy_key: str     # the metrics key of the accuracy `best` follows
  learning_rate: float  # --lr, named in the advice when the support set turns NaN
  label_ids: np.ndarray

  def start(self, rng: np.random.Generator) -> None:
    """A fresh run's state, drawn from the run's generator."""

  def restore(self, arrays: dict, rng: np.random.Generator) -> None:
    """The state of a resumed run from its checkpoint arrays (`rng` is restored after)."""

  def step(self, step: int, rng: np.random.Generator) -> dict:
    """One step from `step` done steps; returns its metrics (loss, ...). Raises
    FloatingPointError when the support set turns NaN/inf (leaving the state as it was)."""

  def rates(self) -> dict:
    """Metrics logged after the step's wall time (e.g. kernel pairs/s)."""

  def evaluate(self, step: int) -> dict:
    """The evaluation of the support set at `step`: {accuracy_key: ..., other metrics}."""

  def arrays(self) -> dict:
    """The state as named arrays for checkpoint.npz (label_ids included)."""

  def support(self, step: int) -> tuple:
    """(images, labels) that support.npz and the evaluations hold at `step`."""

  def support_scalars(self) -> dict:
    """Scalars support.npz keeps beside the set for a run started from it (RCIG's and KIP's
    Platt loss's log temperature); {} where none."""

  def summary(self, end: LoopEnd) -> dict:
    """The run's summary.json."""


def run_steps(algorithm: Algorithm, saved: Optional[tuple], run_dir: Path,
              prepared: run_data.PreparedData, *, steps: int, seed: int, eval_every: int,
              checkpoint_every: int, progress: bool,
              board: Optional[Board] = None) -> dict[str, Any]:
  """Runs `algorithm` for `steps` steps in an opened run directory (`run_in_dir`).

  Logs a metrics.jsonl row per step (step 0: the start), evaluates every `eval_every` steps
  and at the end (0: never), checkpoints (checkpoint.npz with the generator's state, and
  support.npz) every `checkpoint_every` steps, at the end and on a stop signal, then writes
  summary.json and the pictures.

  Args:
    algorithm: the algorithm's step and state.
    saved: the checkpoint to resume from, (arrays, meta); None: a fresh run.
    run_dir: the run directory.
    prepared: the run's data.
    steps, seed, eval_every, checkpoint_every: the run's settings.
    progress: show a progress bar.
    board: a TensorBoard writer, or None.

  Returns:
    The summary (`algorithm.summary`).

  Raises:
    Interrupted: stopped by SIGINT/SIGTERM (after checkpointing).
    FloatingPointError: the support set turned NaN/inf (the message says what to do).
  """
  metrics_path = run_dir / run_files.METRICS
  rng = np.random.default_rng(seed)
  if saved is None:
    algorithm.start(rng)
    step, elapsed, before, best = 0, 0.0, None, None
    run_files.truncate_metrics(metrics_path, -1)
    record = {'step': 0, 'loss': None, 'wall_time': 0.0}
    if eval_every:
      record.update(algorithm.evaluate(0))
      before = record[algorithm.accuracy_key]
      best = {'accuracy': before, 'step': 0}
      logging.info('Step 0: %s %.4f (initial support).', algorithm.accuracy_key, before)
    run_files.append_metrics(metrics_path, record)
    if board:
      board(record, algorithm.support(0)[0], algorithm.label_ids)
  else:
    arrays, meta = saved
    algorithm.restore(arrays, rng)
    rng.bit_generator.state = meta['rng_state']
    step, elapsed, before, best = meta['step'], meta['elapsed'], meta['before'], meta['best']
    run_files.truncate_metrics(metrics_path, step)
    logging.info('%s: Resuming at step %d of %d.', algorithm.name, step, steps)

  def save(step_done: int) -> None:
    checkpoint.save_checkpoint(run_dir, algorithm.arrays(), {
        'step': step_done, 'rng_state': rng.bit_generator.state, 'elapsed': elapsed,
        'before': before, 'best': best})
    run_data.write_support(run_dir, prepared, *algorithm.support(step_done), algorithm.label_ids,
                           algorithm.support_scalars())

  last_saved = step
  if saved is None:
    save(0)
  bar = None
  if progress:
    from ntkdd.server import progress as progress_bar  # pylint: disable=import-outside-toplevel
    bar = progress_bar.ProgressBar(steps, desc=f'{algorithm.name} {prepared.dataset.name}',
                                   initial=step)
  accuracy = None                       # measured by this loop
  shown = before if saved is None else None   # on the progress bar
  with StopFlag() as stop:
    while step < steps:
      t0 = time.time()
      try:
        fields = algorithm.step(step, rng)
      except FloatingPointError:
        raise FloatingPointError(nan_advice(step + 1, last_saved, run_dir, '--lr',
                                            algorithm.learning_rate)) from None
      step += 1
      elapsed += time.time() - t0
      record = {'step': step, **fields, 'wall_time': elapsed, **algorithm.rates()}
      evaluated = bool(eval_every) and (step % eval_every == 0 or step == steps)
      if evaluated:
        try:
          record.update(algorithm.evaluate(step))
        except FloatingPointError:   # the support set is finite but its kernel is not
          raise FloatingPointError(nan_advice(step, last_saved, run_dir, '--lr',
                                              algorithm.learning_rate)) from None
        accuracy = shown = record[algorithm.accuracy_key]
        if best is None or accuracy > best['accuracy']:
          best = {'accuracy': accuracy, 'step': step}
      run_files.append_metrics(metrics_path, record)
      if board:
        board(record, algorithm.support(step)[0] if evaluated else None, algorithm.label_ids)
      if bar:
        bar.update(step, loss=record['loss'], acc=shown)
      if step % checkpoint_every == 0 or step == steps or stop.signal:
        save(step)
        last_saved = step
      if stop.signal:
        if bar:
          bar.close()
        raise Interrupted(f'Stopped by signal at step {step}; checkpoint saved in {run_dir}. '
                          f'Continue with the same command plus --resume.')
  if bar:
    bar.close()
  summary = algorithm.summary(LoopEnd(step, elapsed, before, best, accuracy, saved is None))
  run_files.write_json(run_dir / run_files.SUMMARY, summary)
  render_pictures(run_dir)
  return summary
