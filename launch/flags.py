"""Range checks of command-line values, as argparse `type=` functions: one place for them all.

Each function turns the flag's text into a value or raises `argparse.ArgumentTypeError`, whose
message argparse prints as `argument --flag: MESSAGE` with the usage line, and exits with 2.
"""
from __future__ import annotations

import argparse
import math

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


def positive_int(text: str) -> int:
  """An int >= 1."""
  value = _int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {value}.')
  return value


def nonnegative_int(text: str) -> int:
  """An int >= 0."""
  value = _int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be >= 0, got {value}.')
  return value


def seed(text: str) -> int:
  """A PRNG seed in 0..2^32-1."""
  value = _int(text)
  if not 0 <= value <= SEED_MAX:
    raise argparse.ArgumentTypeError(f'must be in 0..{SEED_MAX}, got {value}.')
  return value


def positive_float(text: str) -> float:
  """A finite float > 0."""
  value = _float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f'must be > 0, got {text}.')
  return value


def nonnegative_float(text: str) -> float:
  """A finite float >= 0."""
  value = _float(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be >= 0, got {text}.')
  return value
