"""Models KIP step time and parallel efficiency of the distributed kernel service at scale.

From per-pair kernel costs (forward and vjp seconds per pair on one worker, measured with
bench/kernel_throughput.py) and per-message costs, it predicts one KIP step for W workers:

  rounds    = the kernel round and the vjp round, each of n_s (n_s + n_t) pairs (the code
              computes K(support, [support; targets]): K_ss whole, not a triangle).
              --plan tiles: every block padded to block x block; equal blocks on equal
              workers take ceil(blocks / W) block times per round (the straggler is what
              that adds to pairs / W). --plan balanced: pairs / W plus the last (smallest)
              tail block.
  broadcast = the wait for the support images before a worker can start: direct, one copy
              per worker receiving blocks over the coordinator's link (all of them before
              the last starts when there is one wave of blocks, about half otherwise); tree,
              one copy from the coordinator then log_(fanout+1) W hops over the workers' links.
  transfer  = bytes per step / coordinator bandwidth; only what the rounds cannot hide counts.
  solve     = coordinator's closed-form KRR work (n_s^3 / 3 + 4 n_s^2 C + 3 n_t n_s C flops,
              C classes) / its flop rate, plus reading K_ts (float64) three times
  step      = rounds + broadcast + unhidden transfer + solve + a latency per round

--step overlap models the overlapped fused step instead (server/fused_step.py with
fused_step='overlap', early_kss_vjp): one round whose compute is the pairs / W (one block per
member, then K_ss's vjp in strips of four blocks per member: the last of those is the
straggler), after the support's arrival (the tree above); the KRR work and the transfers hide
in the round but beta's product and the last group's K_ss strip answer through the
coordinator's link (n_s / groups gradient rows, groups = ceil(W / ceil(sqrt W))). Its bytes
and transfer columns stay the two-round step's (an upper bound: the fused step sends less).

Bytes: support images (see broadcast); target images as indices (the default: workers hold
the dataset; 8 bytes an image in every block request of both rounds) or, with --targets
pixels, as pixels to every worker once per step (the cols cache); kernel blocks back (8 bytes
per pair, NTK and NNGP in float32), cotangent blocks out (4 bytes per pair) and partial
gradients back (one row block of images per block). bench/scale_sim.py runs the real
coordinator against simulated workers on the same inputs; BENCHMARKS.md compares the two.

  python bench/scaling_model.py                                 # CIFAR-10 defaults
  python bench/scaling_model.py --t-fwd 2e-4 --t-vjp 6e-4       # your measured GPU costs
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def step_model(workers: int, n_s: int, n_t: int, image_bytes: int, t_fwd: float, t_vjp: float,
               block: int, bandwidth: float, latency: float, solve_flops: float,
               targets: str = 'indices', plan: str = 'tiles', broadcast: str = 'direct',
               worker_bandwidth: float = 1.25e10, fanout: int = 8, tasks_per_worker: int = 2,
               tail_halvings: int = 2, classes: int = 10,
               memory_bandwidth: float = 1e10, step: str = 'two-round') -> dict:
  """Predicted seconds of one KIP step and their parts (see the module docstring)."""
  pairs = n_s * (n_s + n_t)     # per round: K(support, [support; targets]), then its vjp
  support_bytes = n_s * image_bytes
  if plan == 'tiles':
    row_blocks = -(-n_s // block)
    blocks = row_blocks * (-(-n_s // block) + -(-n_t // block))
    block_pairs = min(block, n_s) * min(block, n_s + n_t)    # every tile padded to this
    waves = -(-blocks // workers)
    rounds_compute = waves * block_pairs * (t_fwd + t_vjp)
    compute = blocks * block_pairs * (t_fwd + t_vjp) / workers
    receivers = min(workers, blocks)
    gradient_rows = blocks * min(block, n_s)
  else:   # balanced: no padding; the last blocks are the smallest tail wave's
    weights = tasks_per_worker + sum(0.5 ** h for h in range(1, tail_halvings + 1))
    last_block = pairs / (workers * weights) * 0.5 ** tail_halvings
    compute = pairs * (t_fwd + t_vjp) / workers
    rounds_compute = compute + last_block * (t_fwd + t_vjp)
    blocks = int(workers * (tasks_per_worker + tail_halvings))
    row_blocks = max(1, min(n_s, blocks))
    receivers = workers
    gradient_rows = blocks      # flat strips: about one row per block
  straggler = rounds_compute - compute
  copy_s = support_bytes / bandwidth
  if broadcast == 'tree':   # one copy from the coordinator, then log_(fanout+1) W hops
    hops = math.ceil(math.log(max(workers, 1)) / math.log(fanout + 1)) if workers > 1 else 0
    support_sent = support_bytes
    broadcast_s = copy_s + hops * (latency + fanout * support_bytes / worker_bandwidth)
  else:     # a copy per worker over the coordinator's link: starts spread over that time
    support_sent = receivers * support_bytes
    broadcast_s = receivers * copy_s / (1 if plan == 'tiles' and waves == 1 else 2)
  if targets == 'indices':
    target_bytes = 2 * row_blocks * n_t * 8    # indices in each block request, both rounds
  else:
    target_bytes = workers * n_t * image_bytes   # the pixels to every worker
  sent = support_sent + target_bytes + 4 * pairs          # + cotangent blocks
  received = 8 * pairs + gradient_rows * image_bytes      # kernel blocks, partial gradients
  transfer = (sent + received) / bandwidth
  excess = max(0.0, transfer - support_sent / bandwidth - rounds_compute)   # not overlapped
  # common/krr.loss_and_gradients: a Cholesky of K_ss, four solves with it, and three
  # (n_t x n_s) by (n_s or n_t x classes) products; K_ts as float64 read a few times.
  solve = (n_s ** 3 / 3 + 4 * n_s ** 2 * classes + 3 * n_t * n_s * classes) / solve_flops
  solve += 3 * 8 * n_s * n_t / memory_bandwidth
  total = rounds_compute + broadcast_s + excess + solve + 2 * latency
  if step == 'overlap':
    compute = pairs * (t_fwd + t_vjp) / workers
    groups = -(-workers // math.ceil(math.sqrt(workers)))
    straggler = n_s * n_s / (4 * workers) * t_vjp    # one block of a K_ss strip
    rounds_compute = compute + straggler
    solve = 2 * n_s ** 2 * classes / solve_flops     # beta = inverse @ K r, after the round
    excess = (n_s / groups) * image_bytes / bandwidth + latency   # the last strip's answer
    total = rounds_compute + broadcast_s + excess + solve + 2 * latency
  return {'workers': workers, 'step_s': total, 'compute_s': compute, 'straggler_s': straggler,
          'transfer_s': transfer, 'broadcast_s': broadcast_s, 'solve_s': solve,
          'bytes_per_step': sent + received}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--image-shape', default='32x32x3')
  p.add_argument('--classes', type=int, default=10)
  p.add_argument('--ipcs', default='10,50')
  p.add_argument('--target-batch', type=int, default=5000, help='the public KIP demo uses 5000')
  p.add_argument('--workers', default='1,8,64,256')
  p.add_argument('--t-fwd', type=float, default=1 / 12.0,
                 help='seconds per forward pair on one worker (default: this CPU, 32x32x3 '
                      'depth 3, jax 0.10; an H100 is far faster: pass your measurement)')
  p.add_argument('--t-vjp', type=float, default=1 / 7.0, help='seconds per vjp pair')
  p.add_argument('--block', type=int, default=64)
  p.add_argument('--bandwidth', type=float, default=1.25e9,
                 help='coordinator network bytes/s (10 Gbit/s = 1.25e9)')
  p.add_argument('--latency', type=float, default=5e-4, help='seconds per RPC round trip')
  p.add_argument('--solve-flops', type=float, default=5e10, help="coordinator's flop/s")
  p.add_argument('--targets', default='indices', choices=('indices', 'pixels'),
                 help='how target images reach the workers (default indices, as ntkdd does)')
  p.add_argument('--plan', default='tiles', choices=('tiles', 'balanced'))
  p.add_argument('--broadcast', default='direct', choices=('direct', 'tree'))
  p.add_argument('--worker-bandwidth', type=float, default=1.25e10, help='bytes/s per worker')
  p.add_argument('--fanout', type=int, default=8, help='tree: fetches per source at once')
  p.add_argument('--step', default='two-round', choices=('two-round', 'overlap'),
                 help="the KIP step's design (see above); overlap implies --plan balanced "
                      "--broadcast tree")
  p.add_argument('--json', default='bench/results/scaling_model.json')
  args = p.parse_args(argv)
  h, w, c = (int(v) for v in args.image_shape.split('x'))
  image_bytes = h * w * c * 4
  rows = []
  for ipc in (int(v) for v in args.ipcs.split(',')):
    n_s = ipc * args.classes
    base = None
    for workers in (int(v) for v in args.workers.split(',')):
      r = step_model(workers, n_s, args.target_batch, image_bytes, args.t_fwd, args.t_vjp,
                     args.block, args.bandwidth, args.latency, args.solve_flops, args.targets,
                     args.plan, args.broadcast, args.worker_bandwidth, args.fanout,
                     classes=args.classes, step=args.step)
      base = base or step_model(1, n_s, args.target_batch, image_bytes, args.t_fwd,
                                args.t_vjp, args.block, args.bandwidth, args.latency,
                                args.solve_flops, args.targets, args.plan, args.broadcast,
                                args.worker_bandwidth, args.fanout, classes=args.classes,
                                step=args.step)
      r['ipc'] = ipc
      r['efficiency'] = base['step_s'] / (workers * r['step_s'])
      parts = {k: r[k] for k in ('compute_s', 'straggler_s', 'broadcast_s', 'transfer_s',
                                 'solve_s')}
      r['limit'] = max(parts, key=parts.get).replace('_s', '')
      rows.append(r)
  print(f'KIP step model: {args.image_shape}, target batch {args.target_batch}, '
        f't_fwd {args.t_fwd:.3g} s, t_vjp {args.t_vjp:.3g} s per pair, block {args.block}, '
        f'targets as {args.targets}, plan {args.plan}, broadcast {args.broadcast}')
  print('| ipc | workers | step s | compute s | straggler s | broadcast s | transfer s | solve s '
        '| MB/step | efficiency | limited by |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['ipc']} | {r['workers']} | {r['step_s']:.3g} | {r['compute_s']:.3g} | "
          f"{r['straggler_s']:.3g} | {r['broadcast_s']:.3g} | {r['transfer_s']:.3g} | "
          f"{r['solve_s']:.3g} | "
          f"{r['bytes_per_step'] / 1e6:.1f} | {100 * r['efficiency']:.0f}% | {r['limit']} |")
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps({'args': vars(args), 'rows': rows}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
