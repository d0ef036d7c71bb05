"""Run-directory reports: the support-image grid, the training curves and the `ntkdd show` text."""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ntkdd.server import run_dir as run_files
from ntkdd.server.checkpoint import checkpoint_step
from ntkdd.server.progress import format_duration
from ntkdd.server.run_dir import (CHECKPOINT, CONFIG, CURVES_PNG, EVALUATION, METRICS, SUMMARY,
                                  SUPPORT, SUPPORT_PNG, PathLike, read_json_object,
                                  read_optional_json_object)

GRID_GAP = 2                       # px between cells and around the grid
GRID_LABEL_PADDING = 6             # px either side of the class names
GRID_BACKGROUND = (255, 255, 255)
GRID_GAP_COLOR = (200, 200, 200)
LOSS_COLOR = (31, 119, 180)        # matplotlib's C0 and C1, so both renderers look alike
ACCURACY_COLOR = (255, 127, 14)
MAX_PLOTTED_POINTS = 2000          # longer series are thinned (min and max kept per bucket)

PILLOW_HINT = 'pip install pillow (or pip install ntkdd[images])'
MAKE_RUN_HINT = '`ntkdd distill --out DIR` makes one'

_LOG = logging.getLogger(__name__)


class NotARunDirectoryError(FileNotFoundError):
  """The folder is missing, or lacks a file every run directory has."""


# -- optional imports -----------------------------------------------------------------------

def _import_pillow():
  """(Image, ImageDraw, ImageFont), or an ImportError that says how to install Pillow."""
  try:
    from PIL import Image, ImageDraw, ImageFont
  except ImportError as e:
    raise ImportError(f'Writing PNG pictures needs Pillow: {PILLOW_HINT}.') from e
  return Image, ImageDraw, ImageFont


def _import_matplotlib_figure():
  """matplotlib's Figure and Agg canvas (no pyplot, no global backend); ImportError if absent."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  return Figure, FigureCanvasAgg


# -- files ----------------------------------------------------------------------------------

def _save_png(image, path: PathLike) -> Path:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  run_files.atomic_write_bytes(Path(path), buffer.getvalue())
  return Path(path)


def _require_run_dir(run_dir: PathLike) -> Path:
  run_dir = Path(run_dir)
  if not run_dir.exists():
    raise NotARunDirectoryError(f'{run_dir} does not exist. A run directory holds {CONFIG}, '
                                f'{METRICS} and {SUPPORT}; {MAKE_RUN_HINT}.')
  if not run_dir.is_dir():
    raise NotARunDirectoryError(f'{run_dir} is a file, not a run directory; {MAKE_RUN_HINT}.')
  if not (run_dir / CONFIG).exists():
    raise NotARunDirectoryError(f'{run_dir} is not a run directory: {CONFIG} is missing. '
                                f'{MAKE_RUN_HINT[0].upper()}{MAKE_RUN_HINT[1:]}.')
  return run_dir


# -- metrics --------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def metric_series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`, sorted by step; a step recorded twice keeps its later value."""
  by_step: dict[int, float] = {}
  for record in records:
    step, value = record.get('step'), record.get(key)
    if _is_number(step) and _is_number(value):
      by_step[int(step)] = float(value)
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _thin(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_PLOTTED_POINTS):
  """At most ~max_points points; each bucket keeps its min and max, so spikes stay visible."""
  if len(steps) <= max_points:
    return steps, values
  buckets = np.array_split(np.arange(len(steps)), max_points // 2)
  keep = sorted({int(i) for b in buckets
                 for i in (b[np.argmin(values[b])], b[np.argmax(values[b])])})
  return steps[keep], values[keep]


# -- support grid ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GridLayout:
  """Where everything lies in the support grid (all in pixels)."""
  rows: int
  columns: int
  cell_height: int
  cell_width: int
  scale: int
  label_width: int
  gap: int = GRID_GAP

  @property
  def width(self) -> int:
    return self.label_width + self.columns * (self.cell_width + self.gap) + self.gap

  @property
  def height(self) -> int:
    return self.rows * (self.cell_height + self.gap) + self.gap

  def cell_origin(self, row: int, column: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of a cell."""
    return (self.label_width + self.gap + column * (self.cell_width + self.gap),
            self.gap + row * (self.cell_height + self.gap))


def _to_uint8_nhwc(images_pixels: np.ndarray) -> np.ndarray:
  images = np.asarray(images_pixels, dtype=np.float32)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images_pixels should be (n, H, W, C) with C = 1 (grayscale) or 3 (RGB); '
                     f'got shape {images.shape}.')
  images = np.nan_to_num(images, nan=0.0)
  return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def _row_indices(label_ids: np.ndarray, num_classes: int, max_per_class: int) -> list[np.ndarray]:
  return [np.flatnonzero(label_ids == k)[:max_per_class] for k in range(num_classes)]


def _default_font(image_font, size: int = 12):
  """Pillow's default font; at `size` px where this Pillow can scale it (10.1 and later)."""
  try:
    return image_font.load_default(size=size)
  except TypeError:  # older Pillow: the fixed bitmap font
    return image_font.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def grid_layout(image_shape: Sequence[int], label_ids: Sequence[int],
                class_names: Sequence[str], max_per_class: int = 10,
                min_cell: int = 56) -> GridLayout:
  """The layout `write_support_grid` uses for these images (Pillow measures the names)."""
  Image, ImageDraw, ImageFont = _import_pillow()
  height, width = int(image_shape[0]), int(image_shape[1])
  scale = max(1, math.ceil(min_cell / max(1, min(height, width))))
  label_ids = np.asarray(label_ids, dtype=np.int64)
  rows = _row_indices(label_ids, len(class_names), max_per_class)
  columns = max([len(r) for r in rows] + [1])
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  font = _default_font(ImageFont)
  name_width = max([_text_size(draw, str(n), font)[0] for n in class_names] + [0])
  return GridLayout(rows=len(class_names), columns=columns, cell_height=height * scale,
                    cell_width=width * scale, scale=scale,
                    label_width=name_width + 2 * GRID_LABEL_PADDING)


def _class_names_for(label_ids: np.ndarray, class_names: Optional[Sequence[str]]) -> list[str]:
  names = [str(n) for n in (class_names if class_names is not None else [])]
  largest = int(label_ids.max()) + 1 if label_ids.size else 0
  return names + [str(k) for k in range(len(names), largest)]  # ids past the names: numbers


def support_grid_array(images_pixels: np.ndarray, label_ids: Sequence[int], num_classes: int,
                       max_per_class: int = 10, gap: int = GRID_GAP) -> np.ndarray:
  """The support set as one uint8 (H, W, 3) picture, numpy only: a row per class (class order),
  up to `max_per_class` images each, `gap` px of GRID_GAP_COLOR between cells (no names: for
  viewers that label the picture themselves, such as TensorBoard)."""
  pixels = _to_uint8_nhwc(images_pixels)
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  label_ids = np.asarray(label_ids, dtype=np.int64).reshape(-1)
  rows = _row_indices(label_ids, num_classes, max_per_class)
  columns = max([len(r) for r in rows] + [1])
  height, width = pixels.shape[1:3]
  grid = np.empty((gap + num_classes * (height + gap), gap + columns * (width + gap), 3),
                  np.uint8)
  grid[...] = GRID_GAP_COLOR
  for row, indices in enumerate(rows):
    for column, index in enumerate(indices):
      top, left = gap + row * (height + gap), gap + column * (width + gap)
      grid[top:top + height, left:left + width] = pixels[index]
  return grid


def write_support_grid(path: PathLike, images_pixels: np.ndarray, label_ids: Sequence[int],
                       class_names: Optional[Sequence[str]], max_per_class: int = 10,
                       min_cell: int = 56) -> Path:
  """PNG of the support set: a row per class (class order), its name at the left, up to
  `max_per_class` images each, upscaled by nearest neighbour to at least `min_cell` px.

  `images_pixels` is (n, H, W, C), C = 1 or 3, in [0, 1] (values outside are clipped).
  """
  Image, ImageDraw, ImageFont = _import_pillow()
  pixels = _to_uint8_nhwc(images_pixels)
  label_ids = np.asarray(label_ids, dtype=np.int64).reshape(-1)
  if len(label_ids) != len(pixels):
    raise ValueError(f'{len(pixels)} images but {len(label_ids)} label ids.')
  names = _class_names_for(label_ids, class_names)
  layout = grid_layout(pixels.shape[1:3], label_ids, names, max_per_class, min_cell)
  canvas = Image.new('RGB', (layout.width, layout.height), GRID_GAP_COLOR)
  draw = ImageDraw.Draw(canvas)
  font = _default_font(ImageFont)
  draw.rectangle([0, 0, layout.label_width - 1, layout.height - 1], fill=GRID_BACKGROUND)
  for row, indices in enumerate(_row_indices(label_ids, len(names), max_per_class)):
    _draw_row_label(draw, layout, row, names[row], font)
    for column, index in enumerate(indices):
      canvas.paste(_cell_image(Image, pixels[index], layout.scale),
                   layout.cell_origin(row, column))
  return _save_png(canvas, path)


def _cell_image(Image, pixels_hwc: np.ndarray, scale: int):
  upscaled = pixels_hwc.repeat(scale, axis=0).repeat(scale, axis=1)
  if upscaled.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(upscaled[..., 0])).convert('RGB')
  return Image.fromarray(np.ascontiguousarray(upscaled))


def _draw_row_label(draw, layout: GridLayout, row: int, name: str, font) -> None:
  _, top = layout.cell_origin(row, 0)
  _, text_height = _text_size(draw, name, font)
  y = top + max(0, (layout.cell_height - text_height) // 2)
  draw.text((GRID_LABEL_PADDING, y), name, fill=(0, 0, 0), font=font)


# -- curves ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Panel:
  title: str
  ylabel: str
  label: str
  steps: np.ndarray
  values: np.ndarray
  color: tuple
  log_y: bool


def _curve_panels(records: Sequence[dict]) -> list[_Panel]:
  panels = []
  steps, losses = metric_series(records, 'loss')
  if len(steps):
    panels.append(_Panel('Loss', 'loss (log scale)' if np.all(losses > 0) else 'loss',
                         'training loss', steps, losses, LOSS_COLOR,
                         log_y=bool(np.all(losses > 0))))
  steps, accuracy = metric_series(records, 'krr_test_accuracy')
  if len(steps):
    panels.append(_Panel('KRR test accuracy', 'accuracy (%)', 'KRR test accuracy', steps,
                         100 * accuracy, ACCURACY_COLOR, log_y=False))
  return panels


def write_curves(path: PathLike, records: Sequence[dict], title: str = 'Training curves') -> Path:
  """PNG of loss vs step (log y) and, where recorded, KRR test accuracy (%) vs step.

  Drawn with matplotlib when it is installed, else with Pillow alone.
  """
  panels = _curve_panels(records)
  try:
    Figure, FigureCanvasAgg = _import_matplotlib_figure()
  except ImportError:
    _LOG.debug('matplotlib not installed; drawing %s with Pillow.', path)
    return _save_png(_pillow_curves(panels, title), path)
  return _matplotlib_curves(path, panels, title, Figure, FigureCanvasAgg)


def _matplotlib_curves(path: PathLike, panels: list[_Panel], title: str, Figure,
                       FigureCanvasAgg) -> Path:
  figure = Figure(figsize=(5.2 * max(1, len(panels)), 3.8), dpi=100)
  FigureCanvasAgg(figure)
  if not panels:
    figure.text(0.5, 0.5, 'no loss or accuracy recorded yet', ha='center', va='center')
  for i, panel in enumerate(panels):
    axes = figure.add_subplot(1, len(panels), i + 1)
    steps, values = _thin(panel.steps, panel.values)
    few = len(steps) <= 50
    axes.plot(steps, values, color=tuple(c / 255 for c in panel.color), label=panel.label,
              marker='o' if few else None, markersize=3, linewidth=1.5)
    if panel.log_y:
      axes.set_yscale('log')
    axes.set_title(panel.title)
    axes.set_xlabel('step')
    axes.set_ylabel(panel.ylabel)
    axes.grid(True, which='both', alpha=0.3)
    axes.legend(loc='best')
  figure.suptitle(title)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  run_files.atomic_write_bytes(Path(path), buffer.getvalue())
  return Path(path)


# Pillow fallback: simple axes, ticks and a legend per panel.

PANEL_WIDTH, PANEL_HEIGHT = 520, 380
TITLE_HEIGHT = 28
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 28, 44


def _pillow_curves(panels: list[_Panel], title: str):
  Image, ImageDraw, ImageFont = _import_pillow()
  width = PANEL_WIDTH * max(1, len(panels))
  canvas = Image.new('RGB', (width, PANEL_HEIGHT + TITLE_HEIGHT), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = _default_font(ImageFont, size=13)
  _draw_centered(draw, (0, 0, width, TITLE_HEIGHT), title, font)
  if not panels:
    _draw_centered(draw, (0, TITLE_HEIGHT, width, PANEL_HEIGHT + TITLE_HEIGHT),
                   'no loss or accuracy recorded yet', font)
  for i, panel in enumerate(panels):
    _draw_panel(canvas, draw, (i * PANEL_WIDTH, TITLE_HEIGHT), panel, font)
  return canvas


def _draw_centered(draw, box, text: str, font, fill=(0, 0, 0)) -> None:
  text_width, text_height = _text_size(draw, text, font)
  x0, y0, x1, y1 = box
  draw.text(((x0 + x1 - text_width) / 2, (y0 + y1 - text_height) / 2), text, fill=fill,
            font=font)


def nice_ticks(low: float, high: float, max_ticks: int = 6,
               integer: bool = False) -> list[float]:
  """Round tick values (1, 2 or 5 times a power of ten apart) within [low, high];
  `integer` keeps them whole numbers (steps)."""
  if not (math.isfinite(low) and math.isfinite(high)):
    return []
  if high <= low:
    return [low]
  raw_step = (high - low) / max(1, max_ticks - 1)
  if integer:
    raw_step = max(raw_step, 1.0)
  magnitude = 10 ** math.floor(math.log10(raw_step))
  step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
  first = math.ceil(low / step - 1e-9) * step
  count = int(math.floor((high - first) / step + 1e-9)) + 1
  return [round(first + k * step, 12) for k in range(count)]


def log_ticks(low: float, high: float) -> list[float]:
  """Powers of ten in [low, high]; with fewer than two, the 2s and 5s between as well."""
  exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
  decades = [10.0 ** e for e in exponents if low <= 10.0 ** e <= high]
  if len(decades) >= 2:
    return decades
  ticks = [m * 10.0 ** e for e in exponents for m in (1, 2, 5) if low <= m * 10.0 ** e <= high]
  return ticks if len(ticks) >= 2 else nice_ticks(low, high, max_ticks=4)


def _format_tick(value: float) -> str:
  return f'{value:.4g}'


def _padded_range(low: float, high: float, log_y: bool) -> tuple[float, float]:
  if log_y:
    if high <= low:
      return low / 2, high * 2
    pad = (math.log10(high) - math.log10(low)) * 0.05
    return low / 10 ** pad, high * 10 ** pad
  if high <= low:
    return low - 1, high + 1
  pad = (high - low) * 0.05
  return low - pad, high + pad


def _draw_panel(canvas, draw, origin: tuple[int, int], panel: _Panel, font) -> None:
  left = origin[0] + MARGIN_LEFT
  top = origin[1] + MARGIN_TOP
  right = origin[0] + PANEL_WIDTH - MARGIN_RIGHT
  bottom = origin[1] + PANEL_HEIGHT - MARGIN_BOTTOM
  steps, values = _thin(panel.steps, panel.values)
  x_low, x_high = float(steps[0]), float(steps[-1])
  if x_high <= x_low:
    x_low, x_high = x_low - 1, x_high + 1
  x_pad = (x_high - x_low) * 0.02
  x_low, x_high = x_low - x_pad, x_high + x_pad
  y_low, y_high = _padded_range(float(values.min()), float(values.max()), panel.log_y)
  transform = (math.log10 if panel.log_y else float)

  def to_pixel(step: float, value: float) -> tuple[float, float]:
    x = left + (step - x_low) / (x_high - x_low) * (right - left)
    fraction = (transform(value) - transform(y_low)) / (transform(y_high) - transform(y_low))
    return x, bottom - fraction * (bottom - top)

  _draw_centered(draw, (left, origin[1], right, top), panel.title, font)
  for tick in (log_ticks(y_low, y_high) if panel.log_y else nice_ticks(y_low, y_high)):
    _, y = to_pixel(x_low, tick)
    draw.line([(left, y), (right, y)], fill=(232, 232, 232))
    draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
    label = _format_tick(tick)
    text_width, text_height = _text_size(draw, label, font)
    draw.text((left - 6 - text_width, y - text_height / 2 - 1), label, fill=(0, 0, 0), font=font)
  for tick in nice_ticks(x_low, x_high, integer=True):
    x, _ = to_pixel(tick, y_low)
    draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
    label = _format_tick(tick)
    text_width, _ = _text_size(draw, label, font)
    draw.text((x - text_width / 2, bottom + 6), label, fill=(0, 0, 0), font=font)
  draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
  _draw_centered(draw, (left, bottom + 18, right, bottom + MARGIN_BOTTOM), 'step', font)
  _draw_vertical_label(canvas, draw, (origin[0] + 2, top, bottom), panel.ylabel, font)
  points = [to_pixel(s, v) for s, v in zip(steps, values)]
  if len(points) > 1:
    draw.line(points, fill=panel.color, width=2)
  if len(points) <= 50:
    for x, y in points:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=panel.color)
  _draw_legend(draw, (left, top, right, bottom), points, panel, font)


def _draw_vertical_label(canvas, draw, box, text: str, font) -> None:
  """The y-axis label, turned 90 degrees (drawn on its own small image, then pasted)."""
  Image, ImageDraw, _ = _import_pillow()
  text_width, text_height = _text_size(draw, text, font)
  label = Image.new('RGB', (text_width + 2, text_height + 4), (255, 255, 255))
  ImageDraw.Draw(label).text((1, 0), text, fill=(0, 0, 0), font=font)
  label = label.rotate(90, expand=True)
  x, top, bottom = box
  canvas.paste(label, (int(x), int((top + bottom - label.height) / 2)))


def _legend_box(plot_box, points, size: tuple[int, int]) -> tuple[float, float, float, float]:
  """The plot corner whose legend-sized box covers the fewest points (matplotlib's 'best')."""
  left, top, right, bottom = plot_box
  width, height = size
  corners = [(right - 6 - width, top + 6), (left + 6, top + 6),
             (right - 6 - width, bottom - 6 - height), (left + 6, bottom - 6 - height)]

  def covered(corner) -> int:
    x0, y0 = corner
    return sum(1 for x, y in points
               if x0 - 4 <= x <= x0 + width + 4 and y0 - 4 <= y <= y0 + height + 4)

  x0, y0 = min(corners, key=covered)  # ties keep the first: top right
  return x0, y0, x0 + width, y0 + height


def _draw_legend(draw, plot_box, points, panel: _Panel, font) -> None:
  text_width, text_height = _text_size(draw, panel.label, font)
  swatch, padding = 18, 5
  x0, y0, x1, y1 = _legend_box(plot_box, points, (swatch + 3 * padding + text_width,
                                                  text_height + 2 * padding + 2))
  draw.rectangle([x0, y0, x1, y1], fill=(255, 255, 255), outline=(160, 160, 160))
  middle = (y0 + y1) / 2
  draw.line([(x0 + padding, middle), (x0 + padding + swatch, middle)], fill=panel.color, width=2)
  draw.text((x0 + 2 * padding + swatch, middle - text_height / 2 - 1), panel.label,
            fill=(0, 0, 0), font=font)


# -- rendering a run ------------------------------------------------------------------------

def _load_support(path: Path, config: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(images in [0, 1], label ids, class names) from support.npz, however complete."""
  with np.load(path, allow_pickle=False) as support:
    if 'images_pixels' in support.files:
      pixels = support['images_pixels']
    else:  # older files: stretch the preprocessed images to [0, 1] for display
      _LOG.warning('%s has no images_pixels; showing rescaled preprocessed images.', path)
      images = support['images'].astype(np.float32)
      pixels = (images - images.min()) / max(float(np.ptp(images)), 1e-12)
    label_ids = (support['label_ids'] if 'label_ids' in support.files
                 else np.argmax(support['labels'], axis=-1))
    names = (support['class_names'].tolist() if 'class_names' in support.files
             else config.get('dataset', {}).get('class_names'))
  return pixels, np.asarray(label_ids), [str(n) for n in (names or [])]


def _run_title(config: dict) -> str:
  flags = config.get('flags', {})
  dataset = config.get('dataset', {}).get('name', flags.get('dataset', '?'))
  algorithm = str(flags.get('algorithm', '?')).upper()
  return f'{algorithm} on {dataset}, {flags.get("ipc", "?")} images per class'


def render_run(run_dir: PathLike) -> list[Path]:
  """(Re)writes support.png and curves.png from the run's files; returns the paths written."""
  run_dir = _require_run_dir(run_dir)
  config = read_json_object(run_dir / CONFIG)
  written = []
  if (run_dir / SUPPORT).exists():
    pixels, label_ids, names = _load_support(run_dir / SUPPORT, config)
    written.append(write_support_grid(run_dir / SUPPORT_PNG, pixels, label_ids, names))
  else:
    _LOG.info('%s has no %s yet; support.png not written.', run_dir, SUPPORT)
  if (run_dir / METRICS).exists():
    written.append(write_curves(run_dir / CURVES_PNG, run_files.read_metrics(run_dir, warn=True), _run_title(config)))
  else:
    _LOG.info('%s has no %s yet; curves.png not written.', run_dir, METRICS)
  return written


# -- export ---------------------------------------------------------------------------------

EXPORT_FORMATS = ('folders', 'npz')
LABELS_CSV = 'labels.csv'


def _folder_name(class_id: int, name: str, width: int) -> str:
  """`07_horse`: the id first (zero-padded, so sorting the folders keeps the class order, as
  torchvision's ImageFolder does), then the name made safe for a path."""
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name).strip('.') or 'class'
  return f'{class_id:0{width}d}_{safe}'


def export_support(run_dir: PathLike, out: PathLike, fmt: str = 'folders') -> Path:
  """Writes a run's distilled set for other tools; returns what was written.

  `folders`: `out/<id>_<class>/<n>.png` (the images in [0, 1] as 8-bit PNG, grayscale or RGB)
  and `out/labels.csv` (file, label_id, class_name and the label vector, learned or one-hot
  minus 1/C, one column per class). `npz`: `out` (a .npz) with the keys of support.npz.
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}: choose one of {", ".join(EXPORT_FORMATS)}.')
  run_dir = _require_run_dir(run_dir)
  if not (run_dir / SUPPORT).exists():
    raise NotARunDirectoryError(f'{run_dir} has no {SUPPORT} yet: nothing to export.')
  out = Path(out)
  config = read_json_object(run_dir / CONFIG)
  with np.load(run_dir / SUPPORT, allow_pickle=False) as support:
    arrays = {key: support[key] for key in support.files}
  if fmt == 'npz':
    if out.suffix != '.npz':
      raise ValueError(f'--out {out}: the npz format writes one file; name it *.npz.')
    out.parent.mkdir(parents=True, exist_ok=True)
    run_files.save_npz(out, arrays)
    return out
  Image, _, _ = _import_pillow()
  pixels, label_ids, names = _load_support(run_dir / SUPPORT, config)
  labels = arrays.get('labels')
  names = _class_names_for(np.asarray(label_ids), names)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f'--out {out} is not empty: export into a new folder.')
  out.mkdir(parents=True, exist_ok=True)
  images = _to_uint8_nhwc(pixels)
  width = len(str(max(len(names) - 1, 0)))
  rows = ['file,label_id,class_name' + ''.join(f',label_{k}' for k in range(
      labels.shape[1] if labels is not None else 0))]
  counts: dict[int, int] = {}
  for image, class_id in zip(images, np.asarray(label_ids, dtype=np.int64)):
    folder = out / _folder_name(int(class_id), names[class_id], width)
    folder.mkdir(exist_ok=True)
    index = counts.get(int(class_id), 0)
    counts[int(class_id)] = index + 1
    path = folder / f'{index:04d}.png'
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    _save_png(picture, path)
    row = [str(path.relative_to(out)), str(int(class_id)), '"' + names[class_id].replace('"', '""') + '"']
    if labels is not None:
      row += [repr(float(v)) for v in labels[len(rows) - 1]]
    rows.append(','.join(row))
  run_files.atomic_write_bytes(out / LABELS_CSV, ('\n'.join(rows) + '\n').encode())
  return out


# -- text summary ---------------------------------------------------------------------------

def _is_accuracy_key(key: str) -> bool:
  """Accuracies (fractions) print as percent: *accuracy* keys, and the transfer results."""
  return 'accurac' in key or (key.startswith('transfer.') and key.rsplit('.', 1)[-1] in (
      'mean', 'std', 'min', 'max'))


def _format_value(key: str, value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    if _is_accuracy_key(key) and 0.0 <= value <= 1.0:
      return f'{100 * value:.2f}%'
    return f'{value:.4g}'
  if isinstance(value, (list, tuple)):
    shown = ', '.join(_format_value(key, v) for v in value[:8])
    return f'[{shown}{", ..." if len(value) > 8 else ""}] ({len(value)} values)'
  return str(value)


def _flatten(mapping: dict, prefix: str = '') -> list[tuple[str, Any]]:
  rows = []
  for key, value in mapping.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      rows.extend(_flatten(value, f'{name}.'))
    else:
      rows.append((name, value))
  return rows


def format_table(mapping: dict, indent: str = '  ') -> str:
  """Nested keys dotted, one per line, values aligned."""
  rows = [(key, _format_value(key, value)) for key, value in _flatten(mapping)]
  if not rows:
    return f'{indent}(empty)'
  width = max(len(key) for key, _ in rows)
  return '\n'.join(f'{indent}{key.ljust(width)}  {value}' for key, value in rows)


def _format_bytes(size: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if size < 1024 or unit == 'GB':
      return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
    size /= 1024
  return f'{size} B'


def _dataset_line(config: dict) -> str:
  dataset = config.get('dataset', {})
  parts = [str(dataset.get('name', config.get('flags', {}).get('dataset', '?')))]
  if dataset.get('image_shape'):
    parts.append('x'.join(str(d) for d in dataset['image_shape']))
  if dataset.get('num_classes') is not None:
    parts.append(f'{dataset["num_classes"]} classes')
  if dataset.get('checksum'):
    parts.append(f'checksum {str(dataset["checksum"])[:12]}')
  return ', '.join(parts)


def _algorithm_line(flags: dict) -> str:
  keys = [('ipc', 'ipc'), ('steps', 'steps'), ('kernel', 'kernel'), ('arch', 'arch'),
          ('depth', 'depth'), ('learning_rate', 'lr'), ('reg', 'reg'),
          ('learn_labels', 'learn_labels'), ('target_batch', 'target_batch'), ('seed', 'seed')]
  parts = [str(flags.get('algorithm', '?')).upper()]
  parts += [f'{short}={_format_value(short, flags[key])}' for key, short in keys if key in flags]
  return '  '.join(parts)


def _progress_lines(records: list[dict], flags: dict, summary: Optional[dict]) -> list[str]:
  steps_done = max([int(r['step']) for r in records if _is_number(r.get('step'))], default=0)
  if summary and _is_number(summary.get('steps')):
    steps_done = max(steps_done, int(summary['steps']))
  requested = flags.get('steps')
  if str(flags.get('algorithm')).lower() == 'ls':
    lines = ['Steps:         Label Solve (one solve, no steps)']
  elif _is_number(requested) and requested > 0:
    lines = [f'Steps:         {steps_done} / {requested} ({100 * steps_done / requested:.0f}%)'
             + ('' if steps_done >= requested else ', unfinished (a stopped run goes on with '
                                                   '--resume)')]
  else:
    lines = [f'Steps:         {steps_done}']
  loss_steps, losses = metric_series(records, 'loss')
  if len(loss_steps):
    lines.append(f'Last loss:     {losses[-1]:.4g} (step {loss_steps[-1]})')
  acc_steps, accuracies = metric_series(records, 'krr_test_accuracy')
  if len(acc_steps):
    best = int(np.argmax(accuracies))
    lines.append(f'KRR test acc:  best {100 * accuracies[best]:.2f}% (step {acc_steps[best]}), '
                 f'last {100 * accuracies[-1]:.2f}% (step {acc_steps[-1]})'
                 + (f', initial {100 * accuracies[0]:.2f}% (step {acc_steps[0]})'
                    if len(acc_steps) > 1 else ''))
  _, wall_times = metric_series(records, 'wall_time')
  if len(wall_times):
    lines.append(f'Wall time:     {format_duration(float(wall_times.max()))}')
  return lines


def _file_lines(run_dir: Path) -> list[str]:
  lines = []
  checkpoint_path = run_dir / CHECKPOINT
  if checkpoint_path.exists():
    stat = checkpoint_path.stat()
    step = checkpoint_step(checkpoint_path)
    details = ([f'step {step}'] if step is not None else []) + [
        _format_bytes(stat.st_size), f'saved {format_duration(time.time() - stat.st_mtime)} ago']
    lines.append(f'Checkpoint:    {checkpoint_path} ({", ".join(details)})')
  else:
    lines.append('Checkpoint:    none')
  pictures = [run_dir / name for name in (SUPPORT_PNG, CURVES_PNG)]
  present = [str(p) for p in pictures if p.exists()]
  lines.append('Pictures:      ' + (', '.join(present) if present else 'none yet')
               + ('' if len(present) == len(pictures) else
                  '  (written when a run ends, and by `ntkdd show`)'))
  return lines


def summarize_run(run_dir: PathLike) -> str:
  """The text of `ntkdd show RUN_DIR`: what ran, how far, how well, and where its files are."""
  run_dir = _require_run_dir(run_dir)
  config = read_json_object(run_dir / CONFIG)
  flags = config.get('flags', {})
  summary = read_optional_json_object(run_dir / SUMMARY)
  evaluation = read_optional_json_object(run_dir / EVALUATION)
  records = run_files.read_metrics(run_dir, warn=True) if (run_dir / METRICS).exists() else []
  lines = [f'Run directory: {run_dir}',
           f'Dataset:       {_dataset_line(config)}',
           f'Algorithm:     {_algorithm_line(flags)}']
  if config.get('created'):
    lines.append(f'Created:       {config["created"]}')
  if records:
    lines += _progress_lines(records, flags, summary)
  else:
    lines.append(f'Steps:         none recorded yet ({METRICS} is missing or empty)')
  if summary is not None:
    lines += [f'Summary ({SUMMARY}):', format_table(summary)]
  if evaluation is not None:
    lines += [f'Evaluation ({EVALUATION}):', format_table(evaluation)]
  lines += _file_lines(run_dir)
  return '\n'.join(lines)
