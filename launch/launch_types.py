"""The launch types of --launch: each one's kernel backend and distillation, dispatched once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


class LaunchFailed(Exception):
  """A launch that could not run or whose coordinator failed: `message` for stderr, and the
  command's exit code."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.message, self.exit_code = message, exit_code


def _clear_remote_out(cfg, args: argparse.Namespace) -> None:
  """The coordinator runs in another process: the flags are checked here first, and --out is
  cleared here for --overwrite once they are known good."""
  from ntkdd.server import checkpoint  # pylint: disable=import-outside-toplevel
  cfg.validate()
  if args.overwrite:
    checkpoint.remove_run_files(Path(args.out))


def worker_kwargs(args: argparse.Namespace) -> dict:
  """The `KernelWorker` arguments the launch flags set (--pin-workers)."""
  return {'pin_core': True} if args.pin_workers else {}


class LaunchType:
  """What the command line asks of a launch type (each subclass implements the three)."""

  @staticmethod
  def isolate_kernel_command(args: argparse.Namespace, argv: Sequence[str]) -> Optional[int]:
    """Runs `ntkdd kernel` or `ntkdd evaluate` (command line `argv`), whose own process
    coordinates the kernel workers, elsewhere where this launch type needs that; returns its
    exit code, or None to run it in this process (the default)."""
    return None

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    """arch -> kernel backend of the command's flags; workers load `dataset` (a DataSpec
    dict) themselves where they can."""
    raise NotImplementedError

  def distill(self, cfg, args: argparse.Namespace, prepared: Any = None) -> dict:
    """Runs `ntkdd distill`'s job `cfg` (a jobs.Config) and returns its summary; raises
    LaunchFailed when the launch cannot run or its coordinator failed."""
    raise NotImplementedError


class InProcess(LaunchType):
  """Kernels in this process (--workers 0) or in worker threads of it; the run here too."""

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    if args.workers == 0:
      from ntkdd.server import backend  # pylint: disable=import-outside-toplevel
      return lambda arch: backend.InProcessKernels(arch, tile=args.tile, dtype=args.dtype)
    from ntkdd.launch import inprocess  # pylint: disable=import-outside-toplevel
    return lambda arch: inprocess.make_inprocess_backend(
        arch, workers=args.workers, tile=args.tile, dtype=args.dtype, block=args.block,
        dataset=dataset)

  def distill(self, cfg, args: argparse.Namespace, prepared: Any = None) -> dict:
    from ntkdd.server import jobs  # pylint: disable=import-outside-toplevel
    # RCIG without workers evaluates the finite net only; with them, KRR too.
    factory = (None if args.algorithm == 'rcig' and args.workers == 0 else
               self.backend_factory(args, dataset=cfg.data_spec().to_dict()))
    return jobs.run(cfg, args.out, factory, resume=args.resume, progress=not args.no_progress,
                    prepared=prepared, tensorboard=args.tensorboard, overwrite=args.overwrite)


class Launchpad(LaunchType):
  """A Launchpad local_mp program: Courier worker processes and the coordinator."""

  @staticmethod
  def isolate_kernel_command(args: argparse.Namespace, argv: Sequence[str]) -> Optional[int]:
    """`ntkdd kernel` and `ntkdd evaluate` coordinate Courier workers from their own process,
    so the whole command reruns in a private network namespace (unless
    --expose-courier-ports, or `ntkdd evaluate --no-krr`, which starts no workers)."""
    if args.expose_courier_ports or not getattr(args, 'krr', True):
      return None
    from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
    code = 'import sys; from ntkdd.launch.cli import main; sys.exit(main(sys.argv[1:]))'
    try:
      return launchpad_program.rerun_in_private_network([sys.executable, '-c', code, *argv])
    except launchpad_program.PrivateNetworkUnavailable as e:
      raise LaunchFailed(f'ntkdd {args.command}: error: {e}', 2) from e

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
    return lambda arch: launchpad_program.make_launchpad_backend(
        arch, workers=args.workers, tile=args.tile, dtype=args.dtype, block=args.block,
        expose_courier_ports=args.expose_courier_ports, worker_kwargs=worker_kwargs(args))

  @staticmethod
  def distill(cfg, args: argparse.Namespace, prepared: Any = None) -> dict:
    from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
    _clear_remote_out(cfg, args)
    try:
      return launchpad_program.run_local_mp(
          cfg, args.out, workers=args.workers, resume=args.resume, block=args.block,
          worker_tile=args.tile, expose_courier_ports=args.expose_courier_ports,
          worker_kwargs=worker_kwargs(args))
    except launchpad_program.PrivateNetworkUnavailable as e:
      raise LaunchFailed(f'ntkdd distill: error: {e}', 2) from e
    except launchpad_program.CoordinatorFailed as e:
      raise LaunchFailed(f'ntkdd distill: the coordinator failed: {e}', 1) from e


class Ray(LaunchType):
  """Worker actors and a coordinator actor on a Ray cluster."""

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    from ntkdd.launch import ray_launch  # pylint: disable=import-outside-toplevel
    return lambda arch: ray_launch.make_ray_backend(
        arch, workers=args.workers, ray_address=args.ray_address, tile=args.tile,
        dtype=args.dtype, block=args.block, dataset=dataset, worker_kwargs=worker_kwargs(args))

  @staticmethod
  def distill(cfg, args: argparse.Namespace, prepared: Any = None) -> dict:
    from ntkdd.launch import ray_launch  # pylint: disable=import-outside-toplevel
    _clear_remote_out(cfg, args)
    try:
      return ray_launch.run_ray(cfg, args.out, workers=args.workers,
                                ray_address=args.ray_address, resume=args.resume,
                                block=args.block, worker_tile=args.tile,
                                worker_kwargs=worker_kwargs(args))
    except (ray_launch.CoordinatorFailed, ConnectionError) as e:
      raise LaunchFailed(f'ntkdd distill: {e}', 1) from e


LAUNCHES = {'inprocess': InProcess(), 'launchpad': Launchpad(), 'ray': Ray()}
