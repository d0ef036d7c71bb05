"""Range checks of command-line values, as argparse `type=` functions: one place for them all.

Each function turns the flag's text into a value or raises `argparse.ArgumentTypeError`, whose
message argparse prints as `argument --flag: MESSAGE` with the usage line, and exits with 2.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

SEED_MAX = 2 ** 32 - 1   # numpy's and JAX's PRNG seeds


def _int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}.') from None


def _float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {text!r}.') from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}.')
  return value


def _checked(parse: Callable[[str], Any], in_range: Callable[[Any], bool], rule: str,
             name: str, hint: str = '') -> Callable[[str], Any]:
  """An argparse type: `parse`, then `in_range` or 'must be RULE, got VALUE[; HINT].'"""
  def convert(text: str):
    value = parse(text)
    if not in_range(value):
      raise argparse.ArgumentTypeError(f'must be {rule}, got {text}{hint}.')
    return value
  convert.__name__ = name
  return convert


positive_int = _checked(_int, lambda v: v >= 1, '>= 1', 'positive_int')
nonnegative_int = _checked(_int, lambda v: v >= 0, '>= 0', 'nonnegative_int')
seed = _checked(_int, lambda v: 0 <= v <= SEED_MAX, f'in 0..{SEED_MAX}', 'seed')
finite_float = _checked(_float, lambda v: True, 'finite', 'finite_float')
positive_float = _checked(_float, lambda v: v > 0, '> 0', 'positive_float')
nonnegative_float = _checked(_float, lambda v: v >= 0, '>= 0', 'nonnegative_float')
tile = _checked(_int, lambda v: v >= 1, '>= 1', 'tile',
                '; leave --tile out to have it chosen from free memory')
