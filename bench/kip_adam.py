"""KIP's Adam per update: optax in float64 (common/optim.adam) against the numpy Adam it replaced.

  taskset -c 0 .venv/bin/python bench/kip_adam.py [--json out.json]

The numpy Adam is the formula of the checkpoints (`count`, `mu/<name>`, `nu/<name>`), written
here as it was in common/optim.py; both run side by side in one process on the same support.
"""
import argparse
import json
import time

import numpy as np

from ntkdd.common import optim


def numpy_adam(schedule, b1=0.9, b2=0.999, eps=1e-8) -> optim.GradientTransformation:
  """The float64 numpy Adam KIP used before optax."""
  def update(grads, state, params):
    count = int(state['count']) + 1
    new_state, new_params = dict(state, count=np.asarray(count, np.int64)), dict(params)
    for name, grad in grads.items():
      grad = np.asarray(grad, np.float64)
      mu = b1 * state[f'mu/{name}'] + (1 - b1) * grad
      nu = b2 * state[f'nu/{name}'] + (1 - b2) * grad * grad
      new_state[f'mu/{name}'], new_state[f'nu/{name}'] = mu, nu
      step = schedule(count - 1) * (mu / (1 - b1**count)) / (np.sqrt(nu / (1 - b2**count)) + eps)
      new_params[name] = (params[name] - step).astype(params[name].dtype)
    return new_params, new_state
  return optim.GradientTransformation(optim.adam(schedule).init, update)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='10,100,500', help='support images (32x32x3), comma list')
  parser.add_argument('--updates', type=int, default=20)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  print('| support images (32x32x3) | numpy Adam ms/update | optax Adam (float64, jit) ms/update |')
  print('|---:|---:|---:|')
  for n in map(int, args.sizes.split(',')):
    params = {'images': rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
              'labels': rng.normal(size=(n, 10)).astype(np.float32)}
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    schedule = optim.cosine_schedule(0.01, 1000)
    row = {'images': n}
    finals = []
    for name, opt in (('numpy', numpy_adam(schedule)), ('optax', optim.adam(schedule))):
      state, p = opt.init(params), dict(params)
      p, state = opt.update(grads, state, p)   # warm-up: optax import and compilation
      start = time.perf_counter()
      for _ in range(args.updates):
        p, state = opt.update(grads, state, p)
      row[f'{name}_ms'] = (time.perf_counter() - start) / args.updates * 1e3
      finals.append(p['images'])
    row['bitwise_equal'] = bool(np.array_equal(*finals))
    rows.append(row)
    print(f"| {n} | {row['numpy_ms']:.2f} | {row['optax_ms']:.2f} |"
          + ('' if row['bitwise_equal'] else ' (results differ!)'))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
