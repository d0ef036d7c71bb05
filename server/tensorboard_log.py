"""TensorBoard event files of a run (--tensorboard): scalars per step, the support grid per evaluation.

Written with tensorboardX (no TensorFlow; `pip install tensorboardX`, or ntkdd[tensorboard])
into the run directory itself, so `tensorboard --logdir runs/` lists each run by its name and
shows it while it goes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

INSTALL_HINT = "pip install tensorboardX (or pip install 'ntkdd[tensorboard]')"
# metrics.jsonl key -> TensorBoard tag.
SCALAR_TAGS = {
    'loss': 'loss',
    'krr_test_accuracy': 'accuracy/krr_test',
    'test_accuracy': 'accuracy/finite_net_test',
    'target_accuracy': 'accuracy/krr_target_batch',
    'pairs_per_second': 'throughput/kernel_pairs_per_second',
}
SUPPORT_TAG = 'support_images'
# Keys whose presence in a record means the step was an evaluation.
EVALUATION_KEYS = ('krr_test_accuracy', 'test_accuracy')


class TensorBoardLog:
  """Writes a run's metric records (and support grids) as TensorBoard events."""

  def __init__(self, run_dir, flush_secs: int = 10):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ValueError(f'--tensorboard needs tensorboardX: {INSTALL_HINT}.') from e
    self.run_dir = Path(run_dir)
    self._writer = SummaryWriter(logdir=str(self.run_dir), flush_secs=flush_secs)
    logging.info('TensorBoard events in %s: tensorboard --logdir %s', self.run_dir,
                 self.run_dir.parent)

  def log(self, record: dict[str, Any], support_pixels: Optional[np.ndarray] = None,
          label_ids: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> None:
    """The record's scalars at its step; with `support_pixels` ([0, 1], NHWC) and an
    evaluation in the record, the support grid too."""
    step = int(record['step'])
    for key, tag in SCALAR_TAGS.items():
      value = record.get(key)
      if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        self._writer.add_scalar(tag, float(value), step)
    if support_pixels is not None and is_evaluation(record):
      from ntkdd.server import pictures  # pylint: disable=import-outside-toplevel
      grid = pictures.support_grid_array(support_pixels, label_ids, num_classes)
      self._writer.add_image(SUPPORT_TAG, grid, step, dataformats='HWC')

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def is_evaluation(record: dict[str, Any]) -> bool:
  """True when the record holds a test accuracy (the step evaluated the support set)."""
  return any(record.get(k) is not None for k in EVALUATION_KEYS)
