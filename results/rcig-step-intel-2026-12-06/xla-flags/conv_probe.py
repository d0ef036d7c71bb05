# One core: the RCIG ConvNet (widths 128/256/512 at 32/16/8 px) forward, gradient and jvp at
# batch 16 and 256, min of 5 calls in process CPU seconds; run once per XLA_FLAGS value with
# XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 FLAG" taskset -c 1.
import os, sys, time, resource
import jax, jax.numpy as jnp, numpy as np
def conv(x, w): return jax.lax.conv_general_dilated(x, w, (1,1), 'SAME', dimension_numbers=('NHWC','HWIO','NHWC'))
def pool(x): return jax.lax.reduce_window(x, 0., jax.lax.add, (1,2,2,1),(1,2,2,1),'VALID')/4
def net(p, x):
  for w in p[:-1]:
    x = pool(jax.nn.relu(conv(x, w)))
  return x.reshape(x.shape[0], -1) @ p[-1]
k = jax.random.PRNGKey(0); ks = jax.random.split(k, 5)
p = [jax.random.normal(ks[0], (3,3,1,128))*.3, jax.random.normal(ks[1], (3,3,128,256))*.03, jax.random.normal(ks[2], (3,3,256,512))*.02, jax.random.normal(ks[3], (4*4*512, 10))*.01]
for B in (16, 256):
  x = jax.random.normal(ks[4], (B,32,32,1))
  f = jax.jit(lambda p, x: net(p, x).sum())
  g = jax.jit(jax.grad(lambda p, x: net(p, x).sum()))
  jv = jax.jit(lambda p, t, x: jax.jvp(lambda q: net(q, x), (p,), (t,))[1].sum())
  for name, fn, args in (('fwd', f, (p, x)), ('grad', g, (p, x)), ('jvp', jv, (p, p, x))):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(5):
      t0 = time.process_time(); jax.block_until_ready(fn(*args)); ts.append(time.process_time() - t0)
    r = fn(*args); s = float(sum(np.asarray(l).sum() for l in jax.tree_util.tree_leaves(r)))
    print(f"B={B} {name}: {min(ts)*1e3:.1f} ms  (check {s:.6g})", flush=True)
