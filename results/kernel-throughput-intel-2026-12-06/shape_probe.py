"""K(10, N) forward (VJP=1: its vjp) per-pair rate at SIZE (default 32x32x3), ConvNet depth 3, for each column tile in TILES (run_probe.sh runs it)."""
import sys, time, os, json
import numpy as np
from ntkdd.common import architectures, kernels
arch = architectures.Architecture(name='convnet', depth=3)
rng = np.random.default_rng(0)
size = tuple(int(s) for s in os.environ.get('SIZE', '32x32x3').split('x'))
n2 = int(os.environ.get('N2', 256))
tiles = [int(t) for t in os.environ.get('TILES', '256,64,16').split(',')]
vjp = os.environ.get('VJP', '0') == '1'
x1 = rng.standard_normal((10,) + size).astype(np.float32)
x2 = rng.standard_normal((n2,) + size).astype(np.float32)
g = rng.standard_normal((10, n2)).astype(np.float32)
res = {}
for t in tiles:
  f = (lambda: kernels.kernel_vjp(arch, x1, x2, g, g, tile=t)) if vjp else (lambda: kernels.compute_kernel(arch, x1, x2, tile=t))
  f()
  times = []
  for _ in range(int(os.environ.get('REPS', 2))):
    t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
  res[t] = 10 * n2 / min(times)
  print(f'{os.environ.get("TAG","")} tile {t}: {"vjp" if vjp else "fwd"} {res[t]:.1f} pairs/s (times {["%.2f" % s for s in times]})', flush=True)
