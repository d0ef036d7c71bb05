"""Models KIP step time and parallel efficiency of the distributed kernel service at scale.

From per-pair kernel costs (forward and vjp seconds per pair on one worker, measured with
bench/kernel_throughput.py) and per-message costs, it predicts one KIP step for W workers:

  compute   = (forward pairs * t_fwd + vjp pairs * t_vjp) / W       (perfect tiling)
  straggler = one block's time (the last block lands on one worker: block^2 * t_vjp)
  transfer  = bytes per step / coordinator bandwidth   (the coordinator's NIC is the funnel)
  solve     = coordinator's closed-form KRR work (n_s^3 + n_s^2 n_t flops) / its flop rate
  step      = compute + straggler + transfer + solve + per-round latency * rounds

Forward pairs: K_ss (one triangle, n_s (n_s + 1) / 2) plus K_st (n_s n_t); vjp pairs:
n_s (n_s + n_t). Bytes: support images to every worker once per step; target images as
indices (the default: workers hold the dataset; 8 bytes an image in every block request of
both rounds) or, with --targets pixels, as pixels to every worker once per step (the cols
cache); kernel blocks back (8 bytes per pair, NTK and NNGP in float32), cotangent blocks out
(4 bytes per pair) and partial gradients back (one row block of images per block).

  python bench/scaling_model.py                                 # CIFAR-10 defaults
  python bench/scaling_model.py --t-fwd 2e-4 --t-vjp 6e-4       # your measured GPU costs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_model(workers: int, n_s: int, n_t: int, image_bytes: int, t_fwd: float, t_vjp: float,
               block: int, bandwidth: float, latency: float, solve_flops: float,
               targets: str = 'indices') -> dict:
  """Predicted seconds of one KIP step and their parts."""
  forward_pairs = n_s * (n_s + 1) / 2 + n_s * n_t
  vjp_pairs = n_s * (n_s + n_t)
  compute = (forward_pairs * t_fwd + vjp_pairs * t_vjp) / workers
  straggler = block * block * t_vjp if workers > 1 else 0.0
  row_blocks = -(-n_s // block)
  col_blocks = -(-(n_s + n_t) // block)
  blocks = row_blocks * col_blocks
  if targets == 'indices':
    target_bytes = 2 * row_blocks * n_t * 8    # indices in each block request, both rounds
  else:
    target_bytes = workers * n_t * image_bytes   # the pixels to every worker
  sent = (workers * n_s * image_bytes          # support images to every worker
          + target_bytes
          + 4 * vjp_pairs)                     # cotangent blocks
  received = 8 * (forward_pairs) + blocks * block * image_bytes
  transfer = (sent + received) / bandwidth
  solve = (n_s ** 3 + 2 * n_s ** 2 * n_t) / solve_flops
  rounds = 2  # the forward round, then the vjp round
  total = compute + straggler + transfer + solve + rounds * latency * max(1, blocks / workers)
  return {'workers': workers, 'step_s': total, 'compute_s': compute, 'straggler_s': straggler,
          'transfer_s': transfer, 'solve_s': solve, 'bytes_per_step': sent + received}


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
                     args.block, args.bandwidth, args.latency, args.solve_flops, args.targets)
      base = base or step_model(1, n_s, args.target_batch, image_bytes, args.t_fwd,
                                args.t_vjp, args.block, args.bandwidth, args.latency,
                                args.solve_flops, args.targets)
      r['ipc'] = ipc
      r['efficiency'] = base['step_s'] / (workers * r['step_s'])
      parts = {k: r[k] for k in ('compute_s', 'straggler_s', 'transfer_s', 'solve_s')}
      r['limit'] = max(parts, key=parts.get).replace('_s', '')
      rows.append(r)
  print(f'KIP step model: {args.image_shape}, target batch {args.target_batch}, '
        f't_fwd {args.t_fwd:.3g} s, t_vjp {args.t_vjp:.3g} s per pair, block {args.block}, '
        f'targets as {args.targets}')
  print('| ipc | workers | step s | compute s | straggler s | transfer s | solve s | MB/step '
        '| efficiency | limited by |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['ipc']} | {r['workers']} | {r['step_s']:.3g} | {r['compute_s']:.3g} | "
          f"{r['straggler_s']:.3g} | {r['transfer_s']:.3g} | {r['solve_s']:.3g} | "
          f"{r['bytes_per_step'] / 1e6:.1f} | {100 * r['efficiency']:.0f}% | {r['limit']} |")
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps({'args': vars(args), 'rows': rows}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
