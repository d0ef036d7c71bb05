"""Plans the blocks of one coordinator call: fixed square tiles, or strips sized from the worker count.

A plan is a list of `(rows, cols, span)` in queue order: `rows` and `cols` are [start, stop)
ranges and `span` the index of the column span (a part of the call's columns that no block
straddles) the columns lie in. Two plans:

  tiles     squares of `block` rows and columns (the historical default): the number of blocks
            grows with the problem, not the fleet, and the last block of a round is a whole
            tile on one worker while the others wait. With no block given the side is fitted
            to each call's rows (`tile_side`): 10 support images make 10 x 10 blocks, not
            10 x 64 blocks whose columns are mostly padding.
  balanced  row strips sized from the worker count. The first `tasks_per_worker * workers`
            blocks carry most of the pairs in equal shares; then `tail_halvings` waves of
            `workers` blocks, each half the size of the one before, so the blocks left when
            workers run dry are small. Strips are as flat as the share allows (few rows, many
            columns): a vjp block returns one partial gradient per row, summed over its
            columns on the worker, so flat strips mean few gradient bytes to the coordinator.

Both plans are a function of the shapes and the configured worker count only, never of
timing, so summing vjp blocks in plan order is bitwise reproducible. `group_blocks` deals a
plan's blocks to the requests of worker groups (`DistributedKernels(group_size=...)`), also
from the plan alone.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
from typing import Optional, Sequence

from ntkdd.common import kernels

Block = tuple[tuple[int, int], tuple[int, int], int]
PLANS = ('tiles', 'balanced')
SAME_SIZE = 0.75   # a balanced plan's block under this part of a share is not a share
LARGEST_FITTED_BLOCK = 64   # the side a fitted tile plan may not exceed


def tile_side(n_rows: int, block: Optional[int] = None) -> int:
  """The tile plan's block side for a call of `n_rows` rows: `block` as given, else the fewest
  equal tiles of at most LARGEST_FITTED_BLOCK rows (`kernels.fitted_tile`). KIP's calls all
  have the support set as rows, so at 1 image per class (10 rows) a step's blocks are 10 x 10:
  its 110 columns make 11 blocks, where 64-wide blocks padded the 10 support columns to 64 and
  gave two workers 2 blocks and 1 (a CIFAR-10 step through Ray on 2 workers: 26.6 -> 15.8 s).
  """
  if block is not None:
    return int(block)
  return kernels.fitted_tile(max(1, int(n_rows)), LARGEST_FITTED_BLOCK)


def tile_blocks(n_rows: int, col_spans: Sequence[tuple[int, int]], block: int,
                symmetric: bool = False) -> list[Block]:
  """Square tiles of `block`; `symmetric`: only those on or above the diagonal (K(x, x))."""
  col_blocks = [((start + a, start + b), span)
                for span, (start, stop) in enumerate(col_spans)
                for a, b in kernels.tile_ranges(stop - start, block)]
  return [(rows, cols, span) for rows in kernels.tile_ranges(n_rows, block)
          for cols, span in col_blocks if not symmetric or cols[0] >= rows[0]]


def piece_sizes(total_pairs: int, workers: int, tasks_per_worker: int = 2,
                tail_halvings: int = 2) -> list[float]:
  """Target pairs of each block in queue order: equal shares, then halving tail waves."""
  weights = [1.0] * (tasks_per_worker * workers)
  for halving in range(1, tail_halvings + 1):
    weights += [0.5 ** halving] * workers
  unit = total_pairs / sum(weights)
  return [unit * w for w in weights]


def balanced_blocks(n_rows: int, col_spans: Sequence[tuple[int, int]], workers: int,
                    symmetric: bool = False, tasks_per_worker: int = 2, tail_halvings: int = 2,
                    min_pairs: int = 16) -> list[Block]:
  """Row strips of about `piece_sizes` pairs each, largest first (see the module docstring).

  Args:
    n_rows: rows of the call.
    col_spans: [start, stop) column spans no block may straddle, in column order.
    workers: the fleet size the plan is for.
    symmetric: K(x, x) with the columns equal to the rows: blocks cover the upper triangle;
      each diagonal square is one block of its own (its worker mirrors it exactly).
    tasks_per_worker: equal-share blocks per worker before the tail (one per in-flight slot).
    tail_halvings: waves of `workers` blocks after those, each half the size of the last.
    min_pairs: no block is planned smaller than this (tiny problems, huge fleets).
  """
  if workers < 1 or tasks_per_worker < 1 or tail_halvings < 0:
    raise ValueError('balanced_blocks needs workers >= 1, tasks_per_worker >= 1 and '
                     'tail_halvings >= 0.')
  n_cols = sum(stop - start for start, stop in col_spans)
  if not n_rows or not n_cols:
    return []
  total = n_rows * (n_rows + 1) // 2 if symmetric else n_rows * n_cols
  sizes = piece_sizes(total, workers, tasks_per_worker, tail_halvings)

  def height(width: float) -> int:
    """Rows per strip: as few as fit a share in `width`, or a few more, so that a strip
    cuts into whole shares (at most 10% smaller than planned)."""
    fewest = max(1, min(n_rows, math.ceil(sizes[0] / max(width, 1))))
    for rows in range(fewest, min(n_rows, 8 * fewest) + 1):
      shares = rows * width / sizes[0]
      if math.ceil(shares - 1e-9) <= 1.1 * shares:
        return rows
    return fewest

  segments = []            # (rows, (c0, c1), span, splittable)
  if symmetric:
    for r0, r1 in kernels.tile_ranges(n_rows, height(n_rows / 2)):
      segments.append(((r0, r1), (r0, r1), 0, False))
      if r1 < n_rows:
        segments.append(((r0, r1), (r1, n_rows), 0, True))
  else:   # each span in strips of its own height: a narrow span gets taller strips
    for span, (start, stop) in enumerate(col_spans):
      if stop > start:
        segments += [((r0, r1), (start, stop), span, True)
                     for r0, r1 in kernels.tile_ranges(n_rows, height(stop - start))]
  # The first wave is counted, not measured: exactly `tasks_per_worker * workers` pieces of
  # about one share (while pairs last; smaller pieces cut meanwhile do not count). Pieces
  # cut a strip into whole numbers, so they come out a little under a share (5000 columns at
  # 724 pairs a share: 7 pieces of 715), and a wave ended by its pairs held ~2-4% more
  # pieces than workers' slots: the surplus gave some workers a third share, i.e. a round
  # end ~1/3 of a share late (group requests: 33-34 shares for 16 members). The tail waves
  # share the pairs left after it, planned as before from the pairs done.
  first_wave = tasks_per_worker * workers
  tail_sizes = sizes[first_wave:] or sizes[-1:]
  tail_ends = list(itertools.accumulate(tail_sizes))
  # The segments' own pairs: a symmetric plan's diagonal squares hold more than `total`.
  planned = sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1), _, _ in segments)
  blocks, done, first_done, shares, tail_scale = [], 0, 0, 0, 1.0
  for rows, (c0, c1), span, splittable in segments:
    h = rows[1] - rows[0]
    while c0 < c1:
      if shares < first_wave:
        target = sizes[0]
      else:   # the tail's planned sizes, scaled to the pairs the first wave left it
        position = bisect.bisect_right(tail_ends, (done - first_done) / tail_scale)
        target = tail_sizes[min(position, len(tail_sizes) - 1)] * tail_scale
      target = max(target, min_pairs)
      # The rest of the segment in equal pieces of about `target` pairs: no slivers.
      pieces = max(1, math.ceil((c1 - c0) * h / target - 1e-9)) if splittable else 1
      w = -(-(c1 - c0) // pieces)
      blocks.append((rows, (c0, c0 + w), span))
      c0 += w
      done += w * h
      if shares < first_wave and w * h >= SAME_SIZE * sizes[0]:   # a narrow span's short strip
        shares += 1                                         # is not a share: not counted
        if shares == first_wave:
          first_done = done
          tail_scale = (planned - first_done) / sum(tail_sizes)   # > 0 while pairs are left
  # Largest first, so the small blocks are the last ones taken; stable, so ties keep order.
  order = sorted(range(len(blocks)), key=lambda i: -_pairs(blocks[i]))
  return [blocks[i] for i in order]


def column_blocks(n_rows: int, span: tuple[int, int], workers: int, tasks_per_worker: int = 2,
                  tail_halvings: int = 2) -> list[Block]:
  """Blocks of every row against consecutive columns of `span`, about `piece_sizes` pairs each,
  largest first (the fused KIP step: a column's residual needs all its support rows).

  Args:
    n_rows: rows of the call (every block spans them all).
    span: the [start, stop) columns to cover (span index 0).
    workers, tasks_per_worker, tail_halvings: as `balanced_blocks`.
  """
  if workers < 1 or tasks_per_worker < 1 or tail_halvings < 0:
    raise ValueError('column_blocks needs workers >= 1, tasks_per_worker >= 1 and '
                     'tail_halvings >= 0.')
  start, stop = span
  if not n_rows or stop <= start:
    return []
  sizes = piece_sizes(n_rows * (stop - start), workers, tasks_per_worker, tail_halvings)
  # Cut where the pieces' cumulative pairs fall, at whole columns: no piece is empty.
  cuts = sorted({start + round(end / n_rows) for end in itertools.accumulate(sizes)} | {stop})
  edges = [start] + [c for c in cuts if start < c <= stop]
  blocks = [((0, n_rows), (a, b), 0) for a, b in zip(edges, edges[1:])]
  return sorted(blocks, key=lambda block: -_pairs(block))   # stable: ties keep column order


def strip_requests(n_rows: int, n_cols: int, groups: int,
                   pieces: int) -> tuple[list[Block], list[list[int]]]:
  """(a plan, its deal to `groups` requests) giving each request a strip of about equal rows
  (every column) cut into `pieces` blocks of about equal columns (span index 0).

  A vjp answers one partial gradient per row of a request's blocks, so disjoint strips send
  each row's gradient to the coordinator once (the overlapped KIP step's K_ss vjp at 50
  images per class, 256 workers in 16 groups: 6 MB where the balanced plan's deal sent 11).
  """
  if groups < 1 or pieces < 1:
    raise ValueError('strip_requests needs groups >= 1 and pieces >= 1.')
  row_edges = [round(i * n_rows / groups) for i in range(groups + 1)]
  strips = [(a, b) for a, b in zip(row_edges, row_edges[1:]) if b > a]
  col_edges = sorted({round(i * n_cols / pieces) for i in range(pieces + 1)})
  blocks: list[Block] = []
  deal: list[list[int]] = []
  for rows in strips:
    deal.append(list(range(len(blocks), len(blocks) + len(col_edges) - 1)))
    blocks.extend((rows, cols, 0) for cols in zip(col_edges, col_edges[1:]))
  return blocks, deal


def group_blocks(blocks: Sequence[Block], groups: int) -> list[list[int]]:
  """The plan's block indices dealt to `groups` requests of about equal pairs, each in plan
  order.

  The plan (largest first) is taken in size classes: runs of blocks down to one under
  SAME_SIZE of the run's first, i.e. the balanced plan's waves (2 share-sized blocks per
  worker, then halves, then quarters). Each class but the smallest, in row order, goes in
  `groups` runs of equal counts, run j to request j: every request gets the same number of
  blocks of each size (2 shares per member first), and its blocks lie in few row ranges, so
  its summed partial gradient has few rows (the KIP vjp at 10 images per class, 256
  workers: 369 rows over 16 requests against 617 when only the first wave went in runs).
  The smallest class, and each class's last blocks short of a multiple of `groups`, go
  largest first to the request with the fewest pairs so far (ties: the lowest), which evens
  the loads out.
  """
  if groups < 1:
    raise ValueError(f'group_blocks needs groups >= 1, got {groups}.')
  dealt: list[list[int]] = [[] for _ in range(min(groups, len(blocks)))]
  n = len(dealt)
  loads = [0] * n
  classes = _size_classes(blocks)
  # The smallest class balances the loads (by pairs, like the leftovers): in runs too, the
  # requests' loads differed by up to 3% (the classes' blocks are only about equal).
  left_over = classes.pop() if len(classes) > 1 else []
  for size_class in classes:
    size_class.sort(key=lambda i: (blocks[i][2], blocks[i][0], blocks[i][1]))   # row order
    whole = len(size_class) - len(size_class) % n
    for k, i in enumerate(size_class[:whole]):
      run = k * n // whole
      dealt[run].append(i)
      loads[run] += _pairs(blocks[i])
    left_over += size_class[whole:]
  heap = [(load, g) for g, load in enumerate(loads)]
  heapq.heapify(heap)
  for i in sorted(left_over):   # plan order: largest first
    load, g = heapq.heappop(heap)
    dealt[g].append(i)
    heapq.heappush(heap, (load + _pairs(blocks[i]), g))
  return [sorted(request) for request in dealt]


def _size_classes(blocks: Sequence[Block]) -> list[list[int]]:
  """Plan indices in runs of about equal size: a run ends before a block under SAME_SIZE of
  its first (the plan is sorted largest first)."""
  classes: list[list[int]] = []
  for i, block in enumerate(blocks):
    if not classes or _pairs(block) < SAME_SIZE * _pairs(blocks[classes[-1][0]]):
      classes.append([])
    classes[-1].append(i)
  return classes


def split_request(blocks: Sequence[Block], dealt: Sequence[int],
                  head_share: float = 0.75) -> tuple[list[int], list[int]]:
  """A group request's blocks `dealt` (plan order, largest first) as a head request of the
  first blocks up to `head_share` of its pairs, and a tail request of the rest (maybe empty):
  the head's answer travels while the tail computes."""
  total = sum(_pairs(blocks[i]) for i in dealt)
  done, cut = 0, len(dealt)
  for position, i in enumerate(dealt):
    done += _pairs(blocks[i])
    if done >= head_share * total:
      cut = position + 1
      break
  return list(dealt[:cut]), list(dealt[cut:])


def _pairs(block: Block) -> int:
  (r0, r1), (c0, c1), _ = block
  return (r1 - r0) * (c1 - c0)
