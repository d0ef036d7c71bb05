"""Pictures of a run: the support-image grid and the training curves (matplotlib, else Pillow).

Pillow is optional (`pip install pillow`, ntkdd[images]); `support_grid_array` needs numpy
only (TensorBoard's picture of the support set).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ntkdd.server import run_dir as run_files
from ntkdd.server.run_dir import PathLike

GRID_GAP = 2                       # px between cells and around the grid
GRID_LABEL_PADDING = 6             # px either side of the class names
GRID_BACKGROUND = (255, 255, 255)
GRID_GAP_COLOR = (200, 200, 200)
LOSS_COLOR = (31, 119, 180)        # matplotlib's C0 and C1, so both renderers look alike
ACCURACY_COLOR = (255, 127, 14)
MAX_PLOTTED_POINTS = 2000          # longer series are thinned (min and max kept per bucket)

PILLOW_HINT = 'pip install pillow (or pip install ntkdd[images])'

_LOG = logging.getLogger(__name__)


# -- optional imports -----------------------------------------------------------------------

def import_pillow():
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


# -- writing ----------------------------------------------------------------------------------

def save_png(image, path: PathLike) -> Path:
  """A Pillow image as a PNG file, written atomically; returns the path."""
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  run_files.atomic_write_bytes(Path(path), buffer.getvalue())
  return Path(path)


# -- metrics --------------------------------------------------------------------------------

def is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def metric_series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`, sorted by step; a step recorded twice keeps its later value."""
  by_step: dict[int, float] = {}
  for record in records:
    step, value = record.get('step'), record.get(key)
    if is_number(step) and is_number(value):
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


def to_uint8_nhwc(images_pixels: np.ndarray) -> np.ndarray:
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
  Image, ImageDraw, ImageFont = import_pillow()
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


def class_names_for(label_ids: np.ndarray, class_names: Optional[Sequence[str]]) -> list[str]:
  names = [str(n) for n in (class_names if class_names is not None else [])]
  largest = int(label_ids.max()) + 1 if label_ids.size else 0
  return names + [str(k) for k in range(len(names), largest)]  # ids past the names: numbers


def support_grid_array(images_pixels: np.ndarray, label_ids: Sequence[int], num_classes: int,
                       max_per_class: int = 10, gap: int = GRID_GAP) -> np.ndarray:
  """The support set as one uint8 (H, W, 3) picture, numpy only: a row per class (class order),
  up to `max_per_class` images each, `gap` px of GRID_GAP_COLOR between cells (no names: for
  viewers that label the picture themselves, such as TensorBoard)."""
  pixels = to_uint8_nhwc(images_pixels)
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
  Image, ImageDraw, ImageFont = import_pillow()
  pixels = to_uint8_nhwc(images_pixels)
  label_ids = np.asarray(label_ids, dtype=np.int64).reshape(-1)
  if len(label_ids) != len(pixels):
    raise ValueError(f'{len(pixels)} images but {len(label_ids)} label ids.')
  names = class_names_for(label_ids, class_names)
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
  return save_png(canvas, path)


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
    return save_png(_pillow_curves(panels, title), path)
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
  Image, ImageDraw, ImageFont = import_pillow()
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
  Image, ImageDraw, _ = import_pillow()
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
