"""Run reports: the support grid's layout and rows, the curves (matplotlib and the Pillow
fallback), torn metrics, the `ntkdd show` summary and its errors, and the progress bar."""
import io
import json
import logging
import sys

import numpy as np
import pytest

from ntkdd.server import pictures, progress, report
from ntkdd.server import run_dir as run_dir_lib

Image = pytest.importorskip('PIL.Image')

CLASS_NAMES = ['zero', 'one', 'two', 'three']


def _constant_class_images(num_classes, per_class, size, channels):
  """Class k's images are all gray k / num_classes, so each row's colour names its class."""
  label_ids = np.repeat(np.arange(num_classes), per_class)
  gray = (label_ids / num_classes).astype(np.float32)
  images = np.broadcast_to(gray[:, None, None, None], (len(label_ids), size, size, channels))
  return np.ascontiguousarray(images), label_ids


def _fake_run_dir(path, steps_done=40, steps=100, with_accuracy=True, torn=False):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps({
      'command': 'distill',
      'flags': {'algorithm': 'kip', 'ipc': 3, 'steps': steps, 'kernel': 'ntk', 'arch': 'fc',
                'depth': 1, 'learning_rate': 0.04, 'reg': 1e-6, 'dataset': 'toy'},
      'dataset': {'name': 'toy', 'checksum': 'deadbeefcafe0000', 'image_shape': [8, 8, 1],
                  'num_classes': 4, 'class_names': CLASS_NAMES},
      'versions': {}, 'created': '2024-05-01T12:00:00+0000'}))
  lines = [json.dumps({'step': 0, 'loss': None, 'krr_test_accuracy': 0.5, 'wall_time': 0.0})]
  for step in range(1, steps_done + 1):
    record = {'step': step, 'loss': 1.0 / step, 'wall_time': 1.5 * step}
    if with_accuracy and step % 10 == 0:
      record['krr_test_accuracy'] = {10: 0.7, 20: 0.9123, 30: 0.85, 40: 0.8}.get(step, 0.6)
    lines.append(json.dumps(record))
  text = '\n'.join(lines) + '\n' + ('{"step": 41, "loss": 0.0' if torn else '')
  (path / 'metrics.jsonl').write_text(text)
  images, label_ids = _constant_class_images(4, 3, 8, 1)
  np.savez(path / 'support.npz', images=images, images_pixels=images,
           labels=np.eye(4, dtype=np.float32)[label_ids], label_ids=label_ids,
           class_names=np.array(CLASS_NAMES))
  return path


# -- support grid -------------------------------------------------------------------------

@pytest.mark.parametrize('num_classes, per_class, size, channels, max_per_class, min_cell', [
    (4, 3, 8, 1, 10, 56),    # small grayscale: upscaled 7x to 56 px
    (3, 5, 32, 3, 4, 56),    # RGB, more images than max_per_class: 4 columns, 2x
    (2, 1, 60, 3, 10, 56),   # already big enough: not scaled
])
def test_grid_size_and_rows_show_their_class(tmp_path, num_classes, per_class, size, channels,
                                             max_per_class, min_cell):
  images, label_ids = _constant_class_images(num_classes, per_class, size, channels)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(label_ids))  # rows must not depend on the images' order
  names = CLASS_NAMES[:num_classes]
  path = pictures.write_support_grid(tmp_path / 'grid.png', images[order], label_ids[order], names,
                                   max_per_class=max_per_class, min_cell=min_cell)
  layout = pictures.grid_layout((size, size), label_ids, names, max_per_class, min_cell)
  scale = max(1, -(-min_cell // size))
  columns = min(per_class, max_per_class)
  assert (layout.scale, layout.columns, layout.rows) == (scale, columns, num_classes)
  assert layout.label_width > 0
  with Image.open(path) as grid:
    assert grid.size == (layout.label_width + columns * (size * scale + layout.gap) + layout.gap,
                         num_classes * (size * scale + layout.gap) + layout.gap)
    rgb = np.asarray(grid.convert('RGB'))
  for row in range(num_classes):
    expected = round(255 * row / num_classes)
    for column in range(columns):
      x, y = layout.cell_origin(row, column)
      cell = rgb[y:y + size * scale, x:x + size * scale]
      assert cell.shape == (size * scale, size * scale, 3)
      np.testing.assert_array_equal(cell, expected)


def test_grid_rejects_odd_channels_and_mismatched_labels(tmp_path):
  with pytest.raises(ValueError, match='C = 1'):
    pictures.write_support_grid(tmp_path / 'g.png', np.zeros((2, 4, 4, 2)), [0, 1], ['a', 'b'])
  with pytest.raises(ValueError, match='label ids'):
    pictures.write_support_grid(tmp_path / 'g.png', np.zeros((2, 4, 4, 1)), [0], ['a', 'b'])


def test_grid_write_is_atomic(tmp_path):
  images, label_ids = _constant_class_images(2, 2, 4, 1)
  pictures.write_support_grid(tmp_path / 'grid.png', images, label_ids, ['a', 'b'])
  pictures.write_support_grid(tmp_path / 'grid.png', images, label_ids, ['a', 'b'])
  assert [p.name for p in tmp_path.iterdir()] == ['grid.png']  # no temp files left


# -- curves ---------------------------------------------------------------------------------

def _records(n, with_accuracy):
  records = [{'step': s, 'loss': 2.0 / (s + 1), 'wall_time': s * 0.1} for s in range(n)]
  if with_accuracy:
    for record in records[::max(1, n // 20)]:
      record['krr_test_accuracy'] = 0.5 + 0.4 * record['step'] / n
  return records


@pytest.fixture(params=['matplotlib', 'pillow'])
def renderer(request, monkeypatch):
  """Both ways of drawing curves: matplotlib where installed, and the Pillow fallback."""
  if request.param == 'matplotlib':
    pytest.importorskip('matplotlib')
  else:
    def no_matplotlib():
      raise ImportError('No module named matplotlib')
    monkeypatch.setattr(pictures, '_import_matplotlib_figure', no_matplotlib)
  return request.param


@pytest.mark.parametrize('records', [
    _records(1, with_accuracy=False),
    _records(1, with_accuracy=True),
    _records(300, with_accuracy=False),
    _records(300, with_accuracy=True),
    _records(10_000, with_accuracy=True),
    [{'step': 0, 'loss': None, 'krr_test_accuracy': 0.9}],  # Label Solve: accuracy only
    [],
], ids=['one', 'one-acc', 'no-acc', 'acc', '10k', 'accuracy-only', 'empty'])
def test_curves_png_loads(tmp_path, renderer, records):
  path = pictures.write_curves(tmp_path / 'curves.png', records, title='KIP on toy')
  with Image.open(path) as image:
    image.load()
    assert image.width > 300 and image.height > 200
    pixels = np.asarray(image.convert('RGB'))
  assert pixels.min() < 100  # something dark was drawn: axes, text
  assert [p.name for p in tmp_path.iterdir()] == ['curves.png']


def test_two_panels_are_wider_than_one(tmp_path, renderer):
  with Image.open(pictures.write_curves(tmp_path / 'a.png', _records(50, False))) as one:
    with Image.open(pictures.write_curves(tmp_path / 'b.png', _records(50, True))) as two:
      assert two.width > 1.5 * one.width


def test_pillow_fallback_draws_the_line_in_its_colour(tmp_path, monkeypatch):
  monkeypatch.setattr(pictures, '_import_matplotlib_figure',
                      lambda: (_ for _ in ()).throw(ImportError('no matplotlib')))
  with Image.open(pictures.write_curves(tmp_path / 'c.png', _records(10_000, True))) as image:
    pixels = np.asarray(image.convert('RGB')).reshape(-1, 3)
  for colour in (pictures.LOSS_COLOR, pictures.ACCURACY_COLOR):
    assert (pixels == colour).all(axis=1).sum() > 200


def test_missing_pillow_names_the_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'PIL', None)  # `from PIL import ...` now fails
  with pytest.raises(ImportError, match=r'pip install pillow \(or pip install ntkdd\[images\]'):
    pictures.write_support_grid(tmp_path / 'g.png', np.zeros((1, 4, 4, 1)), [0], ['a'])
  monkeypatch.setattr(pictures, '_import_matplotlib_figure',
                      lambda: (_ for _ in ()).throw(ImportError('no matplotlib')))
  with pytest.raises(ImportError, match='pip install pillow'):
    pictures.write_curves(tmp_path / 'c.png', _records(3, True))


def test_ticks_are_round_and_cover_the_range():
  assert pictures.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
  assert pictures.nice_ticks(0.5, 1.5, integer=True) == [1]
  assert pictures.log_ticks(1e-4, 2.0) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
  assert pictures.log_ticks(0.15, 0.6) == [0.2, 0.5]


# -- metrics ------------------------------------------------------------------------------

def test_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
  run_dir = _fake_run_dir(tmp_path / 'run', torn=True)
  with caplog.at_level(logging.WARNING):
    records = run_dir_lib.read_metrics(run_dir, warn=True)
  assert [r['step'] for r in records] == list(range(41))
  assert 'torn last line' in caplog.text


def test_series_keeps_the_later_value_of_a_repeated_step():
  steps, values = pictures.metric_series(
      [{'step': 2, 'loss': 1.0}, {'step': 1, 'loss': 3.0}, {'step': 2, 'loss': 0.5},
       {'step': 3, 'loss': None}, {'step': 4, 'loss': float('nan')}], 'loss')
  assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 0.5]


# -- run directories --------------------------------------------------------------------------

def test_render_run_writes_both_pictures(tmp_path):
  run_dir = _fake_run_dir(tmp_path / 'run')
  paths = report.render_run(run_dir)
  assert [p.name for p in paths] == ['support.png', 'curves.png']
  for path in paths:
    with Image.open(path) as image:
      image.load()


def test_summary_holds_the_key_numbers(tmp_path):
  run_dir = _fake_run_dir(tmp_path / 'run', torn=True)
  (run_dir / 'summary.json').write_text(json.dumps(
      {'krr_test_accuracy_before': 0.5, 'krr_test_accuracy_after': 0.8, 'minutes': 1.0}))
  (run_dir / 'evaluation.json').write_text(json.dumps(
      {'transfer': {'convnet': {'mean': 0.6543, 'std': 0.0123, 'accuracies': [0.64, 0.67]}}}))
  np.savez(run_dir / 'checkpoint.npz', images=np.zeros(1),
           __meta__=np.frombuffer(json.dumps({'step': 40}).encode(), np.uint8))
  report.render_run(run_dir)
  text = report.summarize_run(run_dir)
  for expected in ['toy', '8x8x1', '4 classes', 'KIP', 'ipc=3', 'steps=100', 'kernel=ntk',
                   'arch=fc', 'lr=0.04', '40 / 100', 'Last loss:     0.025 (step 40)',
                   'best 91.23% (step 20)', 'last 80.00% (step 40)', '1m00s',
                   'krr_test_accuracy_after', '80.00%', 'transfer.convnet.mean',
                   '65.43%', 'checkpoint.npz (step 40', 'ago', 'support.png', 'curves.png']:
    assert expected in text, f'{expected!r} missing from:\n{text}'
  # The tables are aligned: values start in one column.
  table = [line for line in text.splitlines() if line.startswith('  krr_test_accuracy')]
  assert len(table) == 2 and len({line.index(line.split()[-1]) for line in table}) == 1


def test_summary_of_a_fresh_run_without_metrics(tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  (run_dir / 'config.json').write_text(json.dumps({'flags': {'algorithm': 'ls', 'ipc': 1}}))
  text = report.summarize_run(run_dir)
  assert 'LS' in text and 'none recorded yet' in text and 'Checkpoint:    none' in text
  assert report.render_run(run_dir) == []


@pytest.mark.parametrize('make', ['missing', 'empty', 'file'])
def test_not_a_run_directory_says_what_is_missing(tmp_path, make):
  target = tmp_path / 'nothing'
  if make == 'empty':
    target.mkdir()
  elif make == 'file':
    target.write_text('x')
  for call in (report.summarize_run, report.render_run):
    with pytest.raises(FileNotFoundError) as info:
      call(target)
    assert isinstance(info.value, report.NotARunDirectoryError)
    assert 'ntkdd distill --out DIR' in str(info.value)
    if make == 'empty':
      assert 'config.json is missing' in str(info.value)


def test_broken_config_is_a_clear_value_error(tmp_path):
  (tmp_path / 'config.json').write_text('{"flags": ')
  with pytest.raises(ValueError, match='config.json is not valid JSON'):
    report.summarize_run(tmp_path)


# -- progress bar -----------------------------------------------------------------------------

class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_in_a_log_prints_few_full_lines_with_eta_and_fields():
  stream, clock = io.StringIO(), FakeClock()
  with progress.ProgressBar(1000, desc='KIP toy', stream=stream, clock=clock) as bar:
    for step in range(1, 1001):
      clock.now += 0.5
      bar.update(step, loss=0.123456789, acc=0.91234 if step >= 50 else None)
  lines = stream.getvalue().splitlines()
  assert '\r' not in stream.getvalue()
  assert 10 <= len(lines) <= 12 + 500 // 30  # every tenth, every 30 s, first and last
  middle = lines[len(lines) // 2]
  assert middle.startswith('KIP toy [') and 'ETA ' in middle and '2 it/s' in middle
  assert 'loss=0.1235' in middle and 'acc=91.23%' in middle
  assert '1000/1000' in lines[-1] and '#' * progress.BAR_WIDTH in lines[-1]
  assert 'in 08:20' in lines[-1]


def test_progress_eta_counts_only_new_steps_of_a_resumed_run():
  stream, clock = io.StringIO(), FakeClock()
  bar = progress.ProgressBar(100, stream=stream, initial=50, clock=clock)
  assert bar.rate() is None and 'ETA --:--' in bar.line()
  clock.now = 10.0
  bar.update(60)  # 10 new steps in 10 s: 1 it/s, 40 to go
  assert bar.rate() == pytest.approx(1.0)
  assert '60/100' in bar.line() and 'ETA 00:40' in bar.line()
  clock.now = 12.0
  bar.update(70)  # from the first update on: 10 steps in 2 s (the slow first step is warm-up)
  assert bar.rate() == pytest.approx(5.0) and 'ETA 00:06' in bar.line()
  bar.close()
  bar.close()  # idempotent
  assert stream.getvalue().count('\n') == 2  # at 60 (first update) and 70 (a tenth more)


class TtyStream(io.StringIO):
  def isatty(self):
    return True


def test_progress_on_a_tty_is_a_tqdm_bar_with_loss_accuracy_and_eta():
  pytest.importorskip('tqdm')
  stream = TtyStream()
  bar = progress.ProgressBar(10, desc='LS', stream=stream, min_interval=0.0, initial=2)
  assert bar.uses_tqdm
  for step in range(3, 11):
    bar.update(step, loss=0.5, acc=0.25 if step > 5 else None)
  bar.close()
  text = stream.getvalue()
  assert text.endswith('\n') and text.count('\n') == 1 and text.count('\r') >= 8
  last = text.rstrip('\n').split('\r')[-1]
  assert last.startswith('LS 100%|') and '10/10' in last and 'ETA 00:00' in last
  assert 'loss=0.5 acc=25.00%' in last and 'it/s' in last


def test_progress_without_tqdm_prints_plain_lines_on_a_tty(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tqdm', None)   # `from tqdm import tqdm` raises ImportError
  stream, clock = TtyStream(), FakeClock()
  bar = progress.ProgressBar(10, desc='LS', stream=stream, clock=clock)
  assert not bar.uses_tqdm
  for step in range(1, 11):
    clock.now += 1.0
    bar.update(step, loss=0.5)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert '\r' not in stream.getvalue() and len(lines) == 10
  assert lines[-1].startswith('LS [') and 'loss=0.5' in lines[-1] and '10/10' in lines[-1]


def test_progress_formats():
  assert progress.format_field('loss', 0.000123456) == 'loss=0.0001235'
  assert progress.format_field('krr_accuracy', 0.5) == 'krr_accuracy=50.00%'
  assert progress.format_field('lr', 3) == 'lr=3'
  assert progress.format_duration(3725, clock=True) == '1:02:05'
  assert progress.format_duration(65, clock=True) == '01:05'
  assert progress.format_duration(None, clock=True) == progress.format_duration(-1, clock=True) \
      == '--:--'
  # The one formatter's other form: `ntkdd status` and `ntkdd show`.
  assert [progress.format_duration(s) for s in (4.25, 125, 3725, -3)] == [
      '4.2s', '2m05s', '1h02m', '0.0s']
  assert progress.format_duration(float('nan')) == progress.format_duration(None) == '-'
  assert progress.format_rate(0.25) == '4 s/it'
  assert progress.format_rate(1234.5) == '1234 it/s'
  assert progress.format_rate(None) == '? it/s'
