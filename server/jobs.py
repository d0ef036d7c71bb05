"""What a coordinator runs: a KIP/LS `DistillConfig` or an `RcigJob`, as one JSON-able dict.

Every launch (inprocess, launchpad, ray) carries its run as `to_dict(cfg)` and runs it with
`run(cfg, ...)`, which dispatches on the algorithm to the same loops the in-process path
uses: `distill.distill` (KIP, LS) or `rcig_loop.run_rcig` (RCIG). An RCIG run distils with a
finite ConvNet on the coordinator; its kernel backend (the launch's workers) only serves the
ConvNet NTK for the infinite-width KRR accuracy of the current support set, logged as
`krr_test_accuracy` beside the finite net's `test_accuracy` at each evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

from ntkdd.common import architectures, choices, optim, rcig
from ntkdd.server import distill

RCIG_KEY = 'rcig'   # the RcigConfig's fields inside an RCIG job's dict
# The KRR evaluation's kernel: the ConvNet NTK (KIP's ConvNet, NTK parameterisation) with the
# kernels' usual initialisation (DistillConfig's defaults); its depth follows the RCIG net's.
KRR_W_STD, KRR_B_STD = distill.DistillConfig.w_std, distill.DistillConfig.b_std


@dataclasses.dataclass(frozen=True)
class RcigJob:
  """An RCIG distillation as the launches carry it.

  settings: the run's data, seed, steps, evaluation and kernel settings (a `DistillConfig`
    with algorithm 'rcig'; its kernel, reg, dtype, tile and eval_test_size set the KRR
    evaluation); net: the RCIG settings.
  """
  settings: distill.DistillConfig
  net: rcig.RcigConfig

  # The parts of the DistillConfig interface that the launches use.
  algorithm = 'rcig'

  @property
  def steps(self) -> int:
    return self.settings.steps

  @property
  def dtype(self) -> str:
    return self.settings.dtype

  @property
  def tile(self) -> Optional[int]:
    return self.settings.tile

  def validate(self) -> None:
    require_optax()
    if self.settings.algorithm != 'rcig':
      raise ValueError(f'An RcigJob needs settings with algorithm rcig, got '
                       f'{self.settings.algorithm!r}.')
    # The shared settings are checked as for KIP (the RCIG ones in RcigConfig's constructor),
    # but for --eval-every, where RCIG's 0 means no evaluation.
    dataclasses.replace(self.settings, algorithm='kip',
                        eval_every=max(1, self.settings.eval_every)).validate()
    if self.settings.eval_every < 0:
      raise ValueError(f'--eval-every must be >= 0, got {self.settings.eval_every}.')

  def architecture(self) -> architectures.Architecture:
    """The kernel the workers serve: the ConvNet NTK at the RCIG net's depth."""
    return architectures.Architecture('convnet', self.net.depth, KRR_W_STD, KRR_B_STD)

  def data_spec(self):
    return self.settings.data_spec()


def require_optax() -> None:
  """An ImportError naming the fix unless optax imports (checked before any process starts)."""
  optim.require_optax('RCIG (its support-set optimisers)')


Config = Union[distill.DistillConfig, RcigJob]


def to_dict(cfg: Config) -> dict[str, Any]:
  """The JSON-able form launches send to their coordinator (`from_dict` reads it back)."""
  if isinstance(cfg, RcigJob):
    return dict(dataclasses.asdict(cfg.settings), **{RCIG_KEY: cfg.net.to_dict()})
  return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
  d = dict(d)
  net = d.pop(RCIG_KEY, None)
  settings = distill.DistillConfig(**d)
  if settings.algorithm == 'rcig':
    if net is None:
      raise ValueError('An RCIG run needs its RCIG settings (the "rcig" entry).')
    return RcigJob(settings, rcig.RcigConfig.from_dict(net))
  return settings


@dataclasses.dataclass(frozen=True)
class AlgorithmDefaults:
  """The settings whose default depends on the algorithm (the command line leaves them unset)."""
  depth: int
  w_std: float
  b_std: float
  learning_rate: float
  ema_decay: float


def defaults_for(algorithm: str) -> AlgorithmDefaults:
  """RCIG's are its net's (`RcigConfig`: depth 3, LeCun normal weights w_std 1, zero biases,
  AdaBelief at 3e-3, as its paper); KIP's and LS's are the kernels' (`DistillConfig`: depth 1,
  w_std sqrt(2), b_std 0.1, Adam at 0.01)."""
  if algorithm == 'rcig':
    net = rcig.RcigConfig()
    return AlgorithmDefaults(net.depth, net.w_std, net.b_std, net.lr_images, net.ema_decay)
  kernel = distill.DistillConfig()
  return AlgorithmDefaults(kernel.depth, kernel.w_std, kernel.b_std, kernel.learning_rate,
                           kernel.ema_decay)


def kernel_preprocess(preprocess: str, arch: str, saved: Optional[str] = None) -> str:
  """The preprocessing a KIP/LS run of `ntkdd distill` uses for `--preprocess preprocess`.

  Args:
    preprocess: the flag's value; a name other than 'auto' is kept.
    arch: the kernel's architecture ('fc' or 'convnet').
    saved: on --resume, the preprocessing the run's config.json records; 'auto' then keeps it,
      so a run continues on the data it was made with. 'auto' saved by runs made before the
      per-family choice means standardisation (`choices.LEGACY_AUTO_PREPROCESS`) and stays
      'auto', also when the flag names that meaning explicitly.

  Returns:
    `saved` or `choices.AUTO_KERNEL_PREPROCESS[arch]` for 'auto', else `preprocess`.
  """
  if saved == 'auto' and preprocess in ('auto', choices.LEGACY_AUTO_PREPROCESS):
    return saved
  if preprocess != 'auto':
    return preprocess
  if saved is not None:
    return saved
  return choices.AUTO_KERNEL_PREPROCESS[arch]


def rcig_job(settings: distill.DistillConfig, net: rcig.RcigConfig,
             flip: str = 'auto') -> tuple[RcigJob, distill.PreparedData]:
  """The RCIG job of `settings` and `net` with RCIG's data policy, and its prepared data.

  Args:
    settings: the run's settings (algorithm 'rcig'); preprocess 'auto' becomes RCIG's:
      channel ZCA for RGB images, as its paper and code whiten them (grayscale: per-channel
      standardisation, which 'auto' already is).
    net: the RCIG settings; its flip_support is set from `flip`.
    flip: one of choices.FLIP_CHOICES; 'auto' mirrors the support for RGB images, as RCIG's
      paper does.

  Returns:
    (the job, its data in model space).
  """
  if flip not in choices.FLIP_CHOICES:
    raise ValueError(f'--rcig-flip must be one of {choices.FLIP_CHOICES}, got {flip!r}.')
  prepared = distill.prepare_data(settings)
  rgb = prepared.x_train.shape[-1] == 3
  if settings.preprocess == 'auto' and rgb:
    settings = dataclasses.replace(settings, preprocess='channel_zca')
    prepared = distill.prepare_data(settings)
  net = dataclasses.replace(net, flip_support=flip == 'on' or (flip == 'auto' and rgb))
  return RcigJob(settings, net), prepared


def krr_evaluator(backend, prepared, settings: distill.DistillConfig) -> Callable:
  """(images, labels) -> KRR test accuracy with `backend`'s kernel, on the same fixed test
  subset (`eval_test_size`, drawn from the seed) as the finite-net evaluation."""
  return functools.partial(distill.krr_test_accuracy, backend, prepared, cfg=settings)


def run(cfg: Config, run_dir: str, backend_factory: Optional[Callable], resume: bool = False,
        progress: bool = True, run_status: Any = None,
        prepared: Optional[distill.PreparedData] = None, overwrite: bool = False,
        tensorboard: bool = False) -> dict[str, Any]:
  """Runs `cfg` into `run_dir` and returns its summary (see `distill.distill`, `run_rcig`).

  `backend_factory`: arch -> kernel backend. RCIG without one (in-process, --workers 0) logs
  the finite net's accuracy only. `run_status`: the caller's published `status.RunStatus`.
  `overwrite`: replace a run already in `run_dir`; `tensorboard`: also TensorBoard events.
  """
  if not isinstance(cfg, RcigJob):
    return distill.distill(cfg, run_dir, backend_factory, resume=resume, progress=progress,
                           prepared=prepared, run_status=run_status, overwrite=overwrite,
                           tensorboard=tensorboard)
  from ntkdd.server import rcig_loop  # pylint: disable=import-outside-toplevel
  cfg.validate()
  prepared = prepared or distill.prepare_data(cfg.settings)
  backend = None if backend_factory is None else backend_factory(cfg.architecture())
  s = cfg.settings
  try:
    return rcig_loop.run_rcig(
        cfg.net, prepared, run_dir, ipc=s.ipc, steps=s.steps, seed=s.seed, resume=resume,
        progress=progress, eval_every=s.eval_every, eval_test_size=s.eval_test_size,
        krr_eval=None if backend is None else krr_evaluator(backend, prepared, s),
        krr_flags=None if backend is None else _krr_flags(cfg), run_status=run_status,
        overwrite=overwrite, tensorboard=tensorboard, data_spec=s.data_spec().to_dict())
  finally:
    if backend is not None:
      getattr(backend, 'close', lambda: None)()


def _krr_flags(cfg: RcigJob) -> dict[str, Any]:
  """What sets the KRR evaluation, for config.json (and the --resume check)."""
  return {'krr_kernel': cfg.settings.kernel, 'krr_reg': cfg.settings.reg,
          'krr_arch': cfg.architecture().to_dict(), 'krr_dtype': cfg.settings.dtype}
