"""The launch types of --launch: each one's kernel backend and distillation, dispatched once."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional


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


class InProcess:
  """Kernels in this process (--workers 0) or in worker threads of it; the run here too."""

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    """arch -> kernel backend; workers load `dataset` (a DataSpec dict) themselves."""
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


class Launchpad:
  """A Launchpad local_mp program: Courier worker processes and the coordinator."""

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
    return lambda arch: launchpad_program.make_launchpad_backend(
        arch, workers=args.workers, tile=args.tile, dtype=args.dtype, block=args.block,
        expose_courier_ports=args.expose_courier_ports)

  @staticmethod
  def distill(cfg, args: argparse.Namespace, prepared: Any = None) -> dict:
    from ntkdd.launch import launchpad_program  # pylint: disable=import-outside-toplevel
    _clear_remote_out(cfg, args)
    try:
      return launchpad_program.run_local_mp(
          cfg, args.out, workers=args.workers, resume=args.resume, block=args.block,
          worker_tile=args.tile, expose_courier_ports=args.expose_courier_ports)
    except launchpad_program.PrivateNetworkUnavailable as e:
      raise LaunchFailed(f'ntkdd distill: error: {e}', 2) from e
    except launchpad_program.CoordinatorFailed as e:
      raise LaunchFailed(f'ntkdd distill: the coordinator failed: {e}', 1) from e


class Ray:
  """Worker actors and a coordinator actor on a Ray cluster."""

  @staticmethod
  def backend_factory(args: argparse.Namespace, dataset: Optional[dict] = None) -> Callable:
    from ntkdd.launch import ray_launch  # pylint: disable=import-outside-toplevel
    return lambda arch: ray_launch.make_ray_backend(
        arch, workers=args.workers, ray_address=args.ray_address, tile=args.tile,
        dtype=args.dtype, block=args.block, dataset=dataset)

  @staticmethod
  def distill(cfg, args: argparse.Namespace, prepared: Any = None) -> dict:
    from ntkdd.launch import ray_launch  # pylint: disable=import-outside-toplevel
    _clear_remote_out(cfg, args)
    try:
      return ray_launch.run_ray(cfg, args.out, workers=args.workers,
                                ray_address=args.ray_address, resume=args.resume,
                                block=args.block, worker_tile=args.tile)
    except (ray_launch.CoordinatorFailed, ConnectionError) as e:
      raise LaunchFailed(f'ntkdd distill: {e}', 1) from e


LAUNCHES = {'inprocess': InProcess(), 'launchpad': Launchpad(), 'ray': Ray()}
