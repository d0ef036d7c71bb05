"""Finite-width test accuracy of RCIG support sets with the RCIG paper's evaluation protocol.

For each run directory (made by `ntkdd distill --algorithm rcig`), trains `--models` ReLU
ConvNets of RCIG's architecture (depth from the run, widths 128/256/512) on its support.npz
(the EMA support and its learned labels, as the run saves them; with its mirror images when
the run used flips) with `train.rcig_protocol` (Adam, 500 warm-up steps then cosine to 1%, MSE
on the labels, batch 256; as RCIG's eval.py runs it: 2500 steps over a 1000-step schedule for 10
images, else 5000 over 2000; with augmentation 1000, else 2000), and tests them on the whole test
split: mean ± std over the models. Settings: `paper` (standard parameterisation, LeCun
initialisation, Adam 1e-4: the paper's code), `paper-da` (the same with its augmentation, one
op per image from crop/rotate/translate/cutout, plus flip/colour for RGB; its code reports
both), and `ntkdd` (NTK parameterisation, 1e-3). `--baseline` adds class-balanced random real
images with one-hot labels under the same protocols.

  python bench/rcig_eval.py --run runs/rcig-mnist-1 --dataset mnist --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# setting -> (parameterisation, w_std, b_std, Adam learning rate, augmented)
SETTINGS = {'paper': ('standard', 1.0, 0.0, 1e-4, False),
            'paper-da': ('standard', 1.0, 0.0, 1e-4, True),
            'ntkdd': ('ntk', 2 ** 0.5, 0.1, 1e-3, False)}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              epilog=__doc__.split('\n\n', 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--run', action='append', required=True, help='RCIG run directory (repeat)')
  p.add_argument('--dataset', required=True, help='the dataset the runs distilled')
  p.add_argument('--data-dir', required=True)
  p.add_argument('--models', type=int, default=5, help='networks per setting (paper: 5)')
  p.add_argument('--settings', default='paper,paper-da',
                 help=f'comma list of {sorted(SETTINGS)}')
  p.add_argument('--train-steps', type=int, default=0, help='0: the protocol\'s')
  p.add_argument('--test-size', type=int, default=0, help='test images; 0 = all')
  p.add_argument('--baseline', action='store_true', help='also random real images')
  p.add_argument('--json', default='bench/results/rcig_eval.json')
  return p.parse_args(argv)


def main(args) -> int:
  from ntkdd.common import augment
  from ntkdd.server import distill, rcig_loop, run_data
  runs = [Path(r) for r in args.run]
  for run in runs:
    if not (run / 'support.npz').exists():
      sys.exit(f'{run} has no support.npz: is it an RCIG run directory?')
  settings = [s.strip() for s in args.settings.split(',') if s.strip()]
  for s in settings:
    if s not in SETTINGS:
      sys.exit(f'Unknown setting {s!r}; choose from {sorted(SETTINGS)}.')
  rows = []
  for run in runs:
    config = json.loads((run / 'config.json').read_text())
    flags, saved = config['flags'], config.get('dataset', {})
    # The run's model space: its preprocessing, and its pooled size where it pooled.
    shape = saved.get('image_shape')
    prepared = distill.prepare_data(distill.DistillConfig(
        dataset=args.dataset, data_dir=args.data_dir, preprocess=saved.get('preprocess', 'auto'),
        image_size=shape[0] if shape else None))
    if shape and list(prepared.x_train.shape[1:]) != list(shape):
      sys.exit(f'{run} distilled {shape} images; {args.dataset} gives '
               f'{list(prepared.x_train.shape[1:])}.')
    x_test, y_test = prepared.x_test, prepared.y_test
    if args.test_size and args.test_size < len(x_test):
      pick = np.sort(np.random.default_rng(0).choice(len(x_test), args.test_size, replace=False))
      x_test, y_test = x_test[pick], y_test[pick]
    with np.load(run / 'support.npz') as f:
      sets = {'distilled': (f['images'], f['labels'])}
    step = max((json.loads(line)['step'] for line in
                (run / 'metrics.jsonl').read_text().splitlines() if line.strip()), default=0)
    ipc = int(flags['ipc'])
    if args.baseline:
      images, labels, _ = run_data.initial_support(prepared, ipc, 'real',
                                                   np.random.default_rng(12345))
      sets['random real'] = (images, labels)
    for name, (images, labels) in sets.items():
      for setting in settings:
        parameterization, w_std, b_std, lr, augmented = SETTINGS[setting]
        strategy = augment.default_strategy(images.shape[-1]) if augmented else ''
        start = time.time()
        result = rcig_loop.finite_accuracy(
            images, labels, x_test, y_test, prepared.num_classes,
            depth=int(flags.get('depth', 3)), width=128, w_std=w_std, b_std=b_std,
            parameterization=parameterization, learning_rate=lr,
            flip=bool(flags.get('flip_support', False)) and name == 'distilled',
            augmentations=strategy, models=args.models, train_steps=args.train_steps)
        rows.append({'run': str(run), 'rcig_steps': step, 'ipc': ipc, 'set': name,
                     'setting': setting, 'parameterization': parameterization, 'lr': lr,
                     'augmentations': strategy, 'train_steps': result['steps'],
                     'models': args.models, 'mean': result['mean'], 'std': result['std'],
                     'accuracies': result['accuracies'], 'test_images': len(x_test),
                     'seconds': time.time() - start})
        r = rows[-1]
        print(f"{run.name} step {step} {name} {setting}: {100 * r['mean']:.2f} ± "
              f"{100 * r['std']:.2f}% ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
  print('| run | RCIG steps | ipc | support | eval setting | train steps | test acc % (mean ± std, '
        'n models) |')
  print('|---|---:|---:|---|---|---:|---|')
  for r in rows:
    print(f"| {Path(r['run']).name} | {r['rcig_steps']} | {r['ipc']} | {r['set']} | "
          f"{r['setting']} ({r['parameterization']}, Adam {r['lr']:g}) | {r['train_steps']} | "
          f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} ({r['models']}) |")
  out = Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'args': vars(args), 'rows': rows}, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main(parse_args()))
