"""Owns issue 12 §4's measurement: KIP's time to accuracy with neural-tangents' kernel against ntkdd's.

One KIP configuration runs once per kernel backend, one after the other, each in its own
subprocess (neural-tangents' float64 never leaks into ours) and each for the same budget of
step wall time. Both drive ntkdd's own KIP step (`server/distill.KipSteps`: kip_gradients,
optax Adam, the lr schedule over --steps, learned labels) from the same seed, so they start
from the same support set and draw the same target batches in the same order; only the
kernel backend differs. Each worker keeps the support set after every step. Afterwards the
KRR test accuracies of those support sets are computed in this process, all with ntkdd's
kernel (the same instrument for both curves, and 10x cheaper than neural-tangents' on the
test split; the two kernels agree to float rounding, tests/test_reference_nt.py). Evaluation
time is recorded, never counted in the budget. The result: the accuracy each reached, and
the first step time at which ours reached neural-tangents' final accuracy (evaluated every
--eval-every steps, then bisected to the step).

The measurement (Python 3.10 environment with neural-tangents, quiet machine):

  .venv-lp/bin/python bench/kip_vs_nt.py --data-dir ../shared/data --json kip_vs_nt.json \
      --runs-dir runs/kip-vs-nt   # keeps the timed runs: a killed evaluation resumes

The evaluations (10^5 kernel pairs each on MNIST's test split, minutes apiece) usually take
longer than the timed runs; --eval-every sets how many. A support set equal to one evaluated
already (step 0: both backends start from the same one) is not evaluated again.

Smoke run (minutes): add --image-size 14 --depth 1 --budget-s 60 --test-size 500.

Ours through the service: backend `ntkdd-launchpad` is the same KIP step over a Launchpad
local_mp program of --ours-workers Courier kernel workers, each pinned to one core (what
`ntkdd distill --launch launchpad --workers N --pin-workers` runs); --eval-workers N evaluates
through such workers too. The benchmark then re-runs itself in a private network namespace
(Courier never listens on the host's network). --reference-json takes neural-tangents' row
(its final accuracy and step wall time) from an earlier results file of this benchmark with
the same configuration instead of running it again:

  .venv-lp/bin/python bench/kip_vs_nt.py --data-dir ../shared/data --backends ntkdd-launchpad \
      --reference-json results/kip-vs-nt-mnist-convnet-1ipc.json --eval-workers 2 \
      --runs-dir runs/kip-vs-nt-lp --json kip_vs_nt_lp.json
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

BACKENDS = ('nt', 'ntkdd', 'ntkdd-launchpad')
OURS = ('ntkdd', 'ntkdd-launchpad')   # ntkdd in this process; ntkdd over Launchpad workers
WORKER_FILE = 'run.npz'
GOAL_RATIO = 0.1   # the issue's goal: ours reaches nt's final accuracy in <= 1/10 of the time


# ----------------------------------------------------------------------------------------------
# Flags and configuration.

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  """The benchmark's flags (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              epilog=__doc__.split('\n', 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', default='mnist', help='dataset name or .npz path (default mnist)')
  p.add_argument('--data-dir', default='../shared/data')
  p.add_argument('--cache-dir', default=None, help='decoded-dataset cache (default ntkdd\'s)')
  p.add_argument('--backends', default='nt,ntkdd',
                 help='kernel backends, run in this order (default nt,ntkdd)')
  p.add_argument('--budget-s', type=float, default=1200.0,
                 help='step wall time per backend, s (default 1200); the step under way when '
                      'it runs out is finished and counted')
  p.add_argument('--ipc', type=int, default=1)
  p.add_argument('--depth', type=int, default=3, help='ConvNet depth (default 3)')
  p.add_argument('--image-size', type=int, default=None,
                 help='average-pool images to this side (smoke tests; default: full size)')
  p.add_argument('--preprocess', default='auto',
                 help="default auto: ntkdd distill's choice for ConvNet kernels")
  p.add_argument('--target-batch', type=int, default=100)
  p.add_argument('--lr', type=float, default=0.2)
  p.add_argument('--lr-schedule', default='cosine', choices=('constant', 'cosine'))
  p.add_argument('--steps', type=int, default=400,
                 help='schedule length, the same for both backends; a backend stops early when '
                      'it gets there within the budget (default 400)')
  p.add_argument('--learn-labels', action=argparse.BooleanOptionalAction, default=True,
                 help='learn the support labels too (default yes, as the issue-12 §3 run)')
  p.add_argument('--reg', type=float, default=1e-6)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--nt-dtype', default='float64', choices=('float32', 'float64'),
                 help="neural-tangents' dtype (default float64, its faster one on this CPU: "
                      '2-3.7x float32, BENCHMARKS.md)')
  p.add_argument('--nt-tile', type=int, default=4,
                 help="neural-tangents' largest tile side (default 4, its fastest at 32x32)")
  p.add_argument('--ours-dtype', default='float32', choices=('float32', 'float64'),
                 help="ntkdd's dtype (default float32, ntkdd distill's)")
  p.add_argument('--ours-tile', type=int, default=None,
                 help="ntkdd's largest tile side (default: auto, as ntkdd distill)")
  p.add_argument('--ours-workers', type=int, default=2,
                 help='Courier kernel workers of backend ntkdd-launchpad, pinned one per core '
                      '(default 2)')
  p.add_argument('--eval-workers', type=int, default=0,
                 help='evaluate through this many pinned Launchpad workers (default 0: in this '
                      'process)')
  p.add_argument('--reference-json', default=None, metavar='PATH',
                 help="neural-tangents' row from an earlier results file of this benchmark "
                      '(same configuration) instead of running backend nt again')
  p.add_argument('--eval-every', type=int, default=10,
                 help='evaluate every N steps, and step 0 and the last (default 10)')
  p.add_argument('--eval-dtype', default='float32', choices=('float32', 'float64'))
  p.add_argument('--bisect', action=argparse.BooleanOptionalAction, default=True,
                 help='bisect to the first step of ours reaching nt\'s final accuracy (default); '
                      '--no-bisect reports the first evaluated one, an upper bound')
  p.add_argument('--test-size', type=int, default=0,
                 help='fixed test subset for smoke runs (default 0: the whole test split)')
  p.add_argument('--json', default=None, help='where to write the results')
  p.add_argument('--runs-dir', default=None, metavar='DIR',
                 help="keep each backend's timed run in DIR (<backend>-run.npz); a backend whose "
                      'file is already there is not run again, so a run killed while evaluating '
                      'resumes with the same flags without redoing the timed steps')
  p.add_argument('--worker', default=None, choices=BACKENDS, help=argparse.SUPPRESS)
  p.add_argument('--worker-out', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.backend_list = [b for b in args.backends.split(',') if b]
  unknown = set(args.backend_list) - set(BACKENDS)
  if unknown or not args.backend_list:
    p.error(f'--backends takes a comma list of {BACKENDS}, got {args.backends!r}.')
  if args.budget_s <= 0 or args.eval_every < 1:
    p.error('--budget-s must be > 0 and --eval-every >= 1.')
  if args.ours_workers < 1 or args.eval_workers < 0:
    p.error('--ours-workers must be >= 1 and --eval-workers >= 0.')
  if args.reference_json and 'nt' in args.backend_list:
    p.error('--reference-json replaces backend nt: leave nt out of --backends.')
  return args


def uses_launchpad(args: argparse.Namespace) -> bool:
  """Whether this run calls Courier workers (then it runs in a private network)."""
  return 'ntkdd-launchpad' in args.backend_list or args.eval_workers > 0


def launchpad_backend(arch, workers: int, tile: Optional[int], dtype: str):
  """`workers` pinned Launchpad kernel workers, blocks fitted to each call (`ntkdd distill
  --launch launchpad --pin-workers`'s backend); a context manager that stops the program."""
  from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
  return launchpad_program.make_launchpad_backend(arch, workers=workers, tile=tile, dtype=dtype,
                                                  block=None, worker_kwargs={'pin_core': True})


def reference_run(path: str, args: argparse.Namespace) -> dict:
  """Neural-tangents' row of an earlier results file, checked to be this configuration.

  Args:
    path: a results JSON of this benchmark that holds an 'nt' row.
    args: this run's flags (the KIP configuration to match).

  Returns:
    The row, plus 'source' (path) and 'source_created' (when that file was written).

  Raises:
    ValueError: the file's KIP configuration differs from this run's.
  """
  with open(path) as f:
    earlier = json.load(f)
  same = ('dataset', 'ipc', 'depth', 'image_size', 'preprocess', 'target_batch', 'lr',
          'lr_schedule', 'steps', 'learn_labels', 'reg', 'seed', 'test_size')
  differ = [k for k in same if earlier['config'].get(k) != getattr(args, k)]
  if differ:
    raise ValueError(f'{path} ran another configuration ({", ".join(differ)} differ): '
                     'its neural-tangents row cannot stand for this one.')
  row = next((r for r in earlier['runs'] if r['backend'] == 'nt'), None)
  if row is None:
    raise ValueError(f'{path} holds no neural-tangents (nt) row.')
  return dict(row, source=path, source_created=earlier.get('created'))


def kip_config(args: argparse.Namespace):
  """The run's `distill.DistillConfig`, as `ntkdd distill --algorithm kip --arch convnet` makes it.

  Args:
    args: the parsed flags.

  Returns:
    The validated config (its dtype and tile are ours; neural-tangents' are the worker's).
  """
  from ntkdd.common import choices  # pylint: disable=import-outside-toplevel
  from ntkdd.server import distill  # pylint: disable=import-outside-toplevel
  preprocess = (choices.AUTO_KERNEL_PREPROCESS['convnet'] if args.preprocess == 'auto'
                else args.preprocess)
  cfg = distill.DistillConfig(
      algorithm='kip', dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
      ipc=args.ipc, steps=args.steps, seed=args.seed, arch='convnet', depth=args.depth,
      kernel='ntk', reg=args.reg, dtype=args.ours_dtype, tile=args.ours_tile,
      preprocess=preprocess, image_size=args.image_size, init='real', learning_rate=args.lr,
      lr_schedule=args.lr_schedule, learn_labels=args.learn_labels,
      target_batch=args.target_batch, eval_test_size=args.test_size)
  cfg.validate()
  return cfg


def make_backend(name: str, args: argparse.Namespace, arch):
  """The kernel backend `name` ('nt' or 'ntkdd') of architecture `arch`."""
  if name == 'nt':
    import nt_kernels  # pylint: disable=import-outside-toplevel  (bench/, needs neural-tangents)
    return nt_kernels.NtKernels(arch, tile=args.nt_tile, dtype=args.nt_dtype)
  if name == 'ntkdd-launchpad':
    return launchpad_backend(arch, args.ours_workers, args.ours_tile, args.ours_dtype)
  from ntkdd.server import backend  # pylint: disable=import-outside-toplevel
  return backend.InProcessKernels(arch, tile=args.ours_tile, dtype=args.ours_dtype)


# ----------------------------------------------------------------------------------------------
# The timed KIP run (worker process).

def rng_digest(rng: np.random.Generator) -> str:
  """A short digest of the generator's state: equal digests, equal target batches drawn."""
  return hashlib.sha256(repr(rng.bit_generator.state).encode()).hexdigest()[:16]


def timed_kip(algorithm, seed: int, steps: int, budget_s: float,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, np.ndarray]:
  """Runs KIP steps until `steps` are done or `budget_s` of step wall time is spent.

  The generator is used as `server/loop.run_steps` uses it (the start, then every step), so a
  backend sees the batches a service run of the same seed draws. Only `algorithm.step` is
  timed: the first step's time includes compiling the backend's kernel functions.

  Args:
    algorithm: a fresh `distill.KipSteps`.
    seed: the run's seed.
    steps: the schedule length (most steps to run).
    budget_s: step wall time after which no new step starts.
    clock: seconds (time.perf_counter).

  Returns:
    Arrays per step 0..done: 'step', 'wall_s' (cumulative step time), 'loss' and
    'target_accuracy' (NaN at step 0), 'rng' (digests), 'images' and 'labels' (the support
    after the step), and 'label_ids'.
  """
  rng = np.random.default_rng(seed)
  algorithm.start(rng)
  images, labels = algorithm.support(0)
  rows = {'wall_s': [0.0], 'loss': [np.nan], 'target_accuracy': [np.nan],
          'rng': [rng_digest(rng)], 'images': [np.array(images)], 'labels': [np.array(labels)]}
  elapsed, done = 0.0, 0
  while done < steps and elapsed < budget_s:
    start = clock()
    fields = algorithm.step(done, rng)
    elapsed += clock() - start
    done += 1
    images, labels = algorithm.support(done)
    for key, value in (('wall_s', elapsed), ('loss', fields['loss']),
                       ('target_accuracy', fields['target_accuracy']), ('rng', rng_digest(rng)),
                       ('images', np.array(images)), ('labels', np.array(labels))):
      rows[key].append(value)
  out = {key: np.asarray(value) for key, value in rows.items()}
  out['step'] = np.arange(done + 1)
  out['label_ids'] = np.asarray(algorithm.label_ids)
  return out


def run_worker(args: argparse.Namespace) -> None:
  """Worker: the timed KIP run of backend `args.worker`, saved to `args.worker_out` (.npz)."""
  from ntkdd.common import kernels  # pylint: disable=import-outside-toplevel
  from ntkdd.server import distill  # pylint: disable=import-outside-toplevel
  # JAX's float64 must be on before any array is made (the data's preprocessing included).
  kernels.enable_float64_if(args.nt_dtype if args.worker == 'nt' else args.ours_dtype)
  cfg = kip_config(args)
  prepared = distill.prepare_data(cfg)
  distill.check_fits_data(cfg, prepared)
  backend = make_backend(args.worker, args, cfg.architecture())
  with backend if hasattr(backend, '__exit__') else contextlib.nullcontext():
    run = timed_kip(distill.KipSteps(cfg, prepared, backend), cfg.seed, cfg.steps, args.budget_s)
  np.savez(args.worker_out, **run)
  print(f'{args.worker}: {len(run["step"]) - 1} steps in {run["wall_s"][-1]:.1f} s of step time',
        file=sys.stderr)


def launch_worker(name: str, argv: list[str], out_dir: str) -> dict[str, np.ndarray]:
  """Runs backend `name`'s timed KIP run in a fresh subprocess (unless `out_dir` already holds
  it); returns its arrays."""
  out = os.path.join(out_dir, f'{name}-{WORKER_FILE}')
  if os.path.exists(out):
    print(f'{name}: reusing the timed run in {out}', file=sys.stderr)
  else:
    command = [sys.executable, os.path.abspath(__file__), *argv, '--worker', name,
               '--worker-out', out + '.partial.npz']
    subprocess.run(command, check=True)
    os.replace(out + '.partial.npz', out)   # only a finished run is ever reused
  with np.load(out) as f:
    return {key: f[key] for key in f.files}


def environment() -> dict[str, Optional[str]]:
  """Versions of the environment (neural-tangents None where it is not importable)."""
  from ntkdd.server import loop  # pylint: disable=import-outside-toplevel
  env = dict(loop.versions())
  try:
    import neural_tangents  # pylint: disable=import-outside-toplevel
    env['neural_tangents'] = neural_tangents.__version__
  except ImportError:
    env['neural_tangents'] = None
  env['cpus'] = str(len(os.sched_getaffinity(0)))
  return env


# ----------------------------------------------------------------------------------------------
# Evaluation and comparison (this process, ntkdd's kernel).

def evaluated_steps(last_step: int, every: int) -> list[int]:
  """Step 0, every `every`-th step and the last one, in order."""
  return sorted(set(range(0, last_step + 1, every)) | {last_step})


def first_step_reaching(curve: dict[int, float], target: float,
                        accuracy_at: Callable[[int], float]) -> Optional[int]:
  """The first step whose accuracy is >= target: the first evaluated one, then bisected back
  between it and the evaluated step before it (assuming one crossing in between).

  Args:
    curve: step -> accuracy of the evaluated steps.
    target: the accuracy to reach.
    accuracy_at: evaluates any step (memoised by the caller).

  Returns:
    The step, or None when no evaluated step reaches target.
  """
  ordered = sorted(curve)
  for before, step in zip([None] + ordered, ordered):
    if curve[step] < target:
      continue
    if before is None:
      return step
    below, reached = before, step
    while reached - below > 1:
      middle = (below + reached) // 2
      if accuracy_at(middle) >= target:
        reached = middle
      else:
        below = middle
    return reached
  return None


def _support_digest(run: dict, step: int) -> str:
  """Names the support set (images and labels) a run held after `step` steps."""
  return hashlib.sha256(run['images'][step].tobytes() + run['labels'][step].tobytes()).hexdigest()


class Evaluator:
  """KRR test accuracy of the workers' support sets with ntkdd's kernel, memoised per step."""

  def __init__(self, args: argparse.Namespace, runs: dict[str, dict],
               saved: Optional[str] = None):
    from ntkdd.common import kernels  # pylint: disable=import-outside-toplevel
    from ntkdd.server import backend, distill, run_data  # pylint: disable=import-outside-toplevel
    kernels.enable_float64_if(args.eval_dtype)   # before the data's arrays are made
    cfg = kip_config(args)
    self.cfg, self.runs, self._run_data = cfg, runs, run_data
    self.prepared = distill.prepare_data(cfg)
    self.backend = (launchpad_backend(cfg.architecture(), args.eval_workers, args.ours_tile,
                                      args.eval_dtype) if args.eval_workers else
                    backend.InProcessKernels(cfg.architecture(), tile=args.ours_tile,
                                             dtype=args.eval_dtype))
    self.test_images = (len(self.prepared.y_test)
                        if run_data.fixed_test_rows(self.prepared, cfg.eval_test_size, cfg.seed)
                        is None else cfg.eval_test_size)
    self.points = {name: {} for name in runs}   # name -> step -> (accuracy, eval seconds)
    self._by_support = {}   # digest of a support set -> accuracy (step 0 is the same for all)
    # Evaluations kept across restarts (--runs-dir): {digest: [accuracy, eval seconds]}.
    self._saved_path, self._saved = saved, {}
    if saved and os.path.exists(saved):
      with open(saved) as f:
        self._saved = json.load(f)

  def accuracy(self, name: str, step: int) -> float:
    """Test accuracy of backend `name`'s support set after `step` steps."""
    if step not in self.points[name]:
      run, start = self.runs[name], time.perf_counter()
      images, labels = run['images'][step], run['labels'][step]
      digest = _support_digest(run, step)
      if digest in self._by_support:   # an equal set was evaluated already: no second eval
        self.points[name][step] = (self._by_support[digest], 0.0)
        return self._by_support[digest]
      if digest in self._saved:        # evaluated by an earlier, killed process
        accuracy, seconds = self._saved[digest]
      else:
        accuracy = self._run_data.krr_test_accuracy(
            self.backend, self.prepared, images, labels, self.cfg.kernel,
            self.cfg.reg, self.cfg.eval_test_size, self.cfg.seed)
        seconds = time.perf_counter() - start
        self._save(digest, accuracy, seconds)
      self._by_support[digest] = accuracy
      self.points[name][step] = (accuracy, seconds)
      print(f'eval {name} step {step}: {accuracy:.4f} ({self.points[name][step][1]:.1f} s)',
            file=sys.stderr)
    return self.points[name][step][0]

  def close(self) -> None:
    """Stops the evaluation's workers, if it has any."""
    if hasattr(self.backend, 'close'):
      self.backend.close()

  def kept_steps(self, name: str) -> list[int]:
    """Steps of backend `name` whose support sets the kept file has evaluated."""
    run = self.runs[name]
    return [step for step in range(len(run['step'])) if _support_digest(run, step) in self._saved]

  def _save(self, digest: str, accuracy: float, seconds: float) -> None:
    """Adds one evaluation to the kept file (atomically), if there is one."""
    if not self._saved_path:
      return
    self._saved[digest] = [accuracy, seconds]
    with open(self._saved_path + '.tmp', 'w') as f:
      json.dump(self._saved, f)
    os.replace(self._saved_path + '.tmp', self._saved_path)

  def curve(self, name: str) -> list[dict]:
    """The evaluated points of `name`, in step order: step, wall_s, test_accuracy, eval_s."""
    run = self.runs[name]
    return [{'step': int(step), 'wall_s': float(run['wall_s'][step]), 'test_accuracy': acc,
             'eval_s': secs} for step, (acc, secs) in sorted(self.points[name].items())]


def compare(evaluator: Evaluator, bisect: bool = True, ours: str = 'ntkdd',
            reference: Optional[dict] = None) -> Optional[dict]:
  """Ours' time to neural-tangents' final accuracy (None unless both backends are known).

  Args:
    evaluator: the evaluated points (more are evaluated here).
    bisect: find the first step by bisection; False: only the evaluated points, so the step
      found is an upper bound ('exact' False) and 'ours_below_at' the evaluated step before it.
    ours: which of our backends (OURS) to compare.
    reference: neural-tangents' row from an earlier results file (`reference_run`), used
      when backend nt did not run here.

  Returns:
    nt's final accuracy and step wall time, the first step at which ours reached it and the
    step wall time there, their ratio and whether it meets the goal (<= GOAL_RATIO).
  """
  if ours not in evaluator.runs or ('nt' not in evaluator.runs and reference is None):
    return None
  if 'nt' in evaluator.runs:
    nt_run = evaluator.runs['nt']
    nt_steps = len(nt_run['step']) - 1
    nt_final = evaluator.accuracy('nt', nt_steps)
    nt_wall, nt_source = float(nt_run['wall_s'][-1]), 'this run'
  else:
    nt_steps, nt_final = reference['steps_done'], reference['final_test_accuracy']
    nt_wall, nt_source = float(reference['step_wall_s']), reference['source']
  ours_run = evaluator.runs[ours]
  # Ours after as many steps as nt took has followed the same batches with the same math (to
  # float rounding): evaluated too, so a curve that is not monotonic between the --eval-every
  # points cannot hide the crossing there. So is ours' last step within the goal's time,
  # which decides the goal whatever the bisection finds.
  if nt_steps < len(ours_run['step']):
    evaluator.accuracy(ours, nt_steps)
  within_goal = [s for s in ours_run['step'] if s and ours_run['wall_s'][s] <= GOAL_RATIO * nt_wall]
  if within_goal:
    evaluator.accuracy(ours, int(max(within_goal)))
  curve = {step: acc for step, (acc, _) in evaluator.points[ours].items()}
  if bisect:   # exact: the step before it is below (or it is step 0)
    step = first_step_reaching(curve, nt_final, lambda s: evaluator.accuracy(ours, s))
    below = None if not step else step - 1
  else:
    step = next((s for s in sorted(curve) if curve[s] >= nt_final), None)
    below = None if step is None else max((s for s in curve if s < step), default=None)
  exact = step is not None and (below is None or below == step - 1)
  ours_s = None if step is None else float(ours_run['wall_s'][step])
  ratio = None if ours_s is None or not nt_wall else ours_s / nt_wall
  if exact or step is None:
    goal_met = None if ratio is None else ratio <= GOAL_RATIO
  else:   # an upper bound: met if the bound is; else unknown (unevaluated steps might reach it)
    goal_met = True if ratio <= GOAL_RATIO else None
  return {'ours': ours, 'nt_final_accuracy': nt_final, 'nt_wall_s': nt_wall,
          'nt_source': nt_source, 'ours_step_reaching': step, 'exact': exact, 'ours_below_at': below,
          'ours_s_to_nt_final': ours_s, 'ratio': ratio, 'goal_ratio': GOAL_RATIO,
          'goal_met': goal_met}


def run_summary(name: str, run: dict, curve: list[dict], args: argparse.Namespace) -> dict:
  """One backend's row of the results: settings, steps, times and its curves."""
  wall = run['wall_s']
  return {
      'backend': name,
      'dtype': args.nt_dtype if name == 'nt' else args.ours_dtype,
      'tile': args.nt_tile if name == 'nt' else args.ours_tile,
      'steps_done': int(len(run['step']) - 1), 'step_wall_s': float(wall[-1]),
      'first_step_s': float(wall[1]) if len(wall) > 1 else None,
      'eval_s_total': float(sum(point['eval_s'] for point in curve)),
      'initial_test_accuracy': curve[0]['test_accuracy'],
      'final_test_accuracy': curve[-1]['test_accuracy'],
      'curve': curve,
      'steps': [{'step': int(s), 'wall_s': float(wall[s]),
                 'loss': None if np.isnan(run['loss'][s]) else float(run['loss'][s]),
                 'target_accuracy': (None if np.isnan(run['target_accuracy'][s])
                                     else float(run['target_accuracy'][s]))}
                for s in run['step']],
  }


def same_start(runs: dict[str, dict]) -> dict[str, bool]:
  """Whether the backends started from the same support and drew the same target batches
  (equal generator digests over the steps all of them ran)."""
  first = list(runs.values())
  common = min(len(run['rng']) for run in first)
  return {
      'same_initial_support': all(np.array_equal(run['images'][0], first[0]['images'][0]) and
                                  np.array_equal(run['label_ids'], first[0]['label_ids'])
                                  for run in first),
      'same_target_batches': all(list(run['rng'][:common]) == list(first[0]['rng'][:common])
                                 for run in first),
  }


def _fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def agreement_with_reference(run: dict, reference: dict) -> dict:
  """Ours' per-step target-batch accuracies against the reference nt row's, over the steps
  both ran (equal batches and the same math give equal figures up to float rounding)."""
  theirs = {row['step']: row['target_accuracy'] for row in reference['steps'] if row['step']}
  common = [s for s in sorted(theirs) if s < len(run['step'])]
  equal = [s for s in common if abs(float(run['target_accuracy'][s]) - theirs[s]) < 1e-9]
  return {'reference_steps_compared': len(common), 'reference_steps_equal_target_accuracy':
          len(equal)}


def table(summaries: list[dict], comparisons: dict[str, Optional[dict]]) -> str:
  """The Markdown table of the results (`comparisons`: ours' backend -> `compare`'s result)."""
  lines = ['| backend | dtype | steps done | step wall s | first step s (compile) | eval s '
           '| initial KRR test acc | final KRR test acc | ours s to nt final | ratio |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for row in summaries:
    comparison = comparisons.get(row['backend'])
    ours = comparison is not None
    reached = comparison['ours_s_to_nt_final'] if ours else None
    ratio = comparison['ratio'] if ours else None
    missed = ours and reached is None
    bound = '<= ' if ours and not comparison.get('exact', True) else ''   # --no-bisect
    name = row['backend'] + (' (earlier run)' if row.get('source') else '')
    lines.append(
        f"| {name} | {row['dtype']} | {row['steps_done']} | {row['step_wall_s']:.1f} "
        f"| {_fmt(row['first_step_s'], '.1f')} | {row['eval_s_total']:.1f} "
        f"| {100 * row['initial_test_accuracy']:.2f}% | {100 * row['final_test_accuracy']:.2f}% "
        f"| {'not reached' if missed else bound + _fmt(reached, '.1f')} "
        f"| {bound + _fmt(ratio, '.3f') if ratio is not None else '-'} |")
  return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
  """Runs the benchmark (or, with --worker, one backend's timed run); returns the results."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/nt_kernels.py
  if args.worker:
    run_worker(args)
    return {}
  if uses_launchpad(args):   # Courier workers: this process and its children in a private net
    from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
    code = launchpad_program.rerun_in_private_network(
        [sys.executable, os.path.abspath(__file__), *argv])
    if code is not None:
      sys.exit(code)
  reference = reference_run(args.reference_json, args) if args.reference_json else None
  started = time.time()
  if args.runs_dir:
    os.makedirs(args.runs_dir, exist_ok=True)
    runs = {name: launch_worker(name, argv, args.runs_dir) for name in args.backend_list}
  else:
    with tempfile.TemporaryDirectory(prefix='kip_vs_nt-') as tmp:
      runs = {name: launch_worker(name, argv, tmp) for name in args.backend_list}
  evaluator = Evaluator(args, runs, os.path.join(args.runs_dir, 'evaluations.json')
                       if args.runs_dir else None)
  try:
    for name, run in runs.items():
      for step in evaluated_steps(len(run['step']) - 1, args.eval_every):
        evaluator.accuracy(name, step)
      for step in evaluator.kept_steps(name):   # what earlier processes evaluated (bisections)
        evaluator.accuracy(name, step)
    comparisons = {name: compare(evaluator, bisect=args.bisect, ours=name, reference=reference)
                   for name in OURS if name in runs}
  finally:
    evaluator.close()
  summaries = ([reference] if reference else []) + [
      run_summary(name, runs[name], evaluator.curve(name), args) for name in runs]
  checks = same_start(runs)
  if reference:
    checks.update({name: agreement_with_reference(runs[name], reference) for name in runs})
  results = {
      'benchmark': 'kip_vs_nt', 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'argv': argv, 'config': {k: v for k, v in vars(args).items()
                               if k not in ('worker', 'worker_out', 'backend_list')},
      'preprocess': evaluator.cfg.preprocess,
      'image_shape': list(evaluator.prepared.x_train.shape[1:]),
      'test_images': evaluator.test_images, 'environment': environment(),
      'checks': checks, 'comparison': comparisons.get('ntkdd'), 'comparisons': comparisons,
      'runs': summaries, 'total_wall_s': time.time() - started,
  }
  print(table(summaries, comparisons))
  print(f"test images: {evaluator.test_images}; checks: {results['checks']}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
