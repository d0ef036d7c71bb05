"""Network architectures ntkdd distils with: the KIP ConvNet, RCIG's ConvNet and fully-connected
ReLU nets."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ntkdd.common import stax

ARCHITECTURES = ('fc', 'convnet', 'rcig_convnet')


@dataclasses.dataclass(frozen=True)
class Architecture:
  """An architecture and its hyper-parameters; `width` matters only at finite width.

  convnet: 3x3 SAME conv + ReLU, then `depth` blocks of [3x3 SAME conv, ReLU, 2x2 average
  pool], flatten, dense readout (the KIP paper's ConvNet). rcig_convnet: RCIG's (and FRePo's)
  ConvNet, see `rcig_convnet_body`, then a dense readout; its paper initialisation is
  w_std=1, b_std=0 in the standard parameterisation (LeCun normal weights, zero biases).
  fc: `depth` blocks of [dense, ReLU], then a dense readout.
  """
  name: str = 'convnet'
  depth: int = 3
  w_std: float = math.sqrt(2.0)
  b_std: float = 0.1
  width: int = 128
  parameterization: str = 'ntk'

  def __post_init__(self):
    if self.name not in ARCHITECTURES:
      raise ValueError(f'Unknown architecture {self.name!r}: choose one of {ARCHITECTURES}.')
    if self.depth < 0 or (self.name in ('fc', 'rcig_convnet') and self.depth < 1):
      raise ValueError(f'depth must be >= 1 for fc and rcig_convnet and >= 0 for convnet, '
                       f'got {self.depth}.')
    if self.w_std <= 0 or self.b_std < 0:
      raise ValueError(f'Need w_std > 0 and b_std >= 0, got {self.w_std}, {self.b_std}.')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Architecture':
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def rcig_convnet_body(depth: int, width: int, w_std: float, b_std: float,
                      parameterization: str, activation=stax.Relu,
                      normalization=None) -> list[stax.Layer]:
  """RCIG's ConvNet up to its flattened features: grayscale images zero-padded by 2 (28x28 ->
  32x32, as its code pads single-channel inputs), then `depth` blocks of [3x3 SAME conv with
  width * 2^i channels, optional normalisation, activation, 2x2 average pool]."""
  layers = [stax.ZeroPad(2, channels=1)]
  for i in range(depth):
    layers.append(stax.Conv(width * 2 ** i, (3, 3), 'SAME', w_std, b_std, parameterization))
    if normalization is not None:
      layers.append(normalization())
    layers += [activation(), stax.AvgPool((2, 2), (2, 2))]
  return layers + [stax.Flatten()]


def build(arch: Architecture, num_outputs: int = 10) -> stax.Layer:
  """The (init_fn, apply_fn, kernel_fn) triple of `arch` with `num_outputs` logits."""
  return stax.serial(*layers(arch, num_outputs))


def layers(arch: Architecture, num_outputs: int = 10) -> list[stax.Layer]:
  """`build`'s layers in order, each an (init_fn, apply_fn, kernel_fn) triple (a profile
  times their prefixes: bench/layer_profile.py)."""
  w, b, width, param = arch.w_std, arch.b_std, arch.width, arch.parameterization
  if arch.name == 'convnet':
    out = [stax.Conv(width, (3, 3), 'SAME', w, b, param), stax.Relu()]
    for _ in range(arch.depth):
      out += [stax.Conv(width, (3, 3), 'SAME', w, b, param), stax.Relu(),
              stax.AvgPool((2, 2), (2, 2))]
    out += [stax.Flatten(), stax.Dense(num_outputs, w, b, param)]
  elif arch.name == 'rcig_convnet':
    out = rcig_convnet_body(arch.depth, width, w, b, param) + [
        stax.Dense(num_outputs, w, b, param)]
  else:
    out = [stax.Flatten()]
    for _ in range(arch.depth):
      out += [stax.Dense(width, w, b, param), stax.Relu()]
    out += [stax.Dense(num_outputs, w, b, param)]
  return out


def check_input_shape(arch: Architecture, image_shape: tuple) -> None:
  """Refuses images too small for the ConvNets' `depth` 2x2 average pools (each halves the
  side, rounding down, and needs a side >= 2), before any kernel or net is computed: a pool of
  a 1-pixel side leaves nothing, and the kernel would be NaN."""
  if arch.name == 'fc' or len(image_shape) != 3:
    return
  height, width, channels = image_shape
  pad = 4 if arch.name == 'rcig_convnet' and channels == 1 else 0   # rcig_convnet_body's ZeroPad
  side = min(height, width) + pad
  smallest = side
  for _ in range(arch.depth):
    smallest //= 2
  if smallest < 1:
    deepest = max(0, int(math.log2(side)))
    raise ValueError(f'{arch.name} depth {arch.depth} is too deep for {height}x{width} images: '
                     f'each of its {arch.depth} 2x2 average pools halves the side, and a side of '
                     f'{side} allows at most {deepest} pools. Use --depth {deepest} or less, or '
                     f'larger images.')
