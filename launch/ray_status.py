"""Status of Ray runs: asks a run's coordinator actor on a Ray cluster for its status snapshot."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from ntkdd.launch import ray_cluster, status_client
from ntkdd.launch.ray_cluster import NAMESPACE, import_ray
from ntkdd.launch.ray_launch import COORDINATOR_PREFIX, coordinator_name, read_address_file
from ntkdd.server import status as status_lib
from ntkdd.server.deadline import DeadlineExceeded, call_with_deadline


class StatusTimeout(status_lib.StatusQueryError):
  """The cluster did not answer in time; Ray may still hold this process's connection."""


def _run_names(ray) -> list[str]:
  names = ray.util.list_named_actors(all_namespaces=True)
  return sorted(a['name'][len(COORDINATOR_PREFIX):] for a in names
                if a.get('namespace') == NAMESPACE and a['name'].startswith(COORDINATOR_PREFIX))


def _connect_quietly(ray_address: Optional[str]) -> bool:
  ray = import_ray()
  if ray.is_initialized():
    return False
  try:
    ray_cluster.check_reachable(ray_address)
  except (ConnectionError, ValueError) as e:
    raise status_lib.StatusQueryError(str(e)) from e
  ray_cluster.use_token_if_available(ray_address)
  try:
    ray.init(address=ray_address or 'auto', namespace=NAMESPACE, log_to_driver=False,
             logging_level=logging.ERROR)
  except ConnectionError as e:
    raise status_lib.StatusQueryError(
        f'No Ray cluster at {ray_address or "auto"}: {e} If the cluster uses token '
        f'authentication, this process needs its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or '
        f'~/.ray/auth_token).') from e
  return True


def _query(ray_address: Optional[str], run_name: Optional[str], timeout_s: float) -> dict:
  ray = import_ray()
  connected_here = _connect_quietly(ray_address)
  try:
    if not run_name:
      runs = _run_names(ray)
      if len(runs) != 1:
        raise status_lib.StatusQueryError(
            f'{len(runs)} ntkdd runs on the Ray cluster at {ray_address}: '
            f'{", ".join(runs) or "none"}. Name one with --run.')
      run_name = runs[0]
    try:
      actor = ray.get_actor(coordinator_name(run_name), namespace=NAMESPACE)
    except ValueError:
      runs = _run_names(ray)
      raise status_lib.StatusQueryError(
          f'No run named {run_name!r} on the Ray cluster at {ray_address}; runs there: '
          f'{", ".join(runs) or "none"}.') from None
    try:
      answer = ray.get(actor.status.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
      raise status_lib.StatusQueryError(f'No status answer from run {run_name!r} within '
                                        f'{timeout_s:g} s.') from None
    except ray.exceptions.RayError as e:
      raise status_lib.StatusQueryError(f'No status from run {run_name!r}: {e}') from e
    snapshot = status_lib.decode(answer)
    snapshot.update(ray_run=run_name, ray_address=ray_cluster.cluster_address())
    # The status table's coordinator row: where to ask again.
    snapshot.setdefault('address', f"ray {snapshot['ray_address']} run {run_name}")
    return snapshot
  finally:
    if connected_here:
      ray.shutdown()


def query_ray_status(ray_address: Optional[str], run_name: Optional[str] = None,
                     timeout_s: float = 10.0, connect_timeout_s: float = 60.0) -> dict:
  """The status snapshot of run `run_name`'s coordinator actor on the cluster at `ray_address`.

  `ray_address` may also be a run directory (its ray_address.txt gives the address and, unless
  `run_name` is given, the run). Without a run name the cluster's only run is asked. Uses this
  process's Ray connection if it has one. Raises `StatusQueryError`; `StatusTimeout` when no
  answer came within connect_timeout_s + timeout_s (a cluster that went away while `ray.init`
  was connecting retries for minutes).
  """
  import_ray()
  if ray_address and Path(ray_address).is_dir():
    ray_address, saved_name = read_address_file(ray_address)
    run_name = run_name or saved_name
  try:
    return call_with_deadline(_query, connect_timeout_s + timeout_s,
                              (ray_address, run_name, timeout_s), name='ntkdd-ray-status')
  except DeadlineExceeded:
    raise StatusTimeout(f'No answer from the Ray cluster at {ray_address or "auto"} within '
                        f'{connect_timeout_s + timeout_s:g} s.') from None


def status_main(ray_address: Optional[str], run_name: Optional[str] = None,
                as_json: bool = False, timeout_s: float = 10.0) -> int:
  """`ntkdd status --ray-address ADDRESS [--run NAME] [--json]`: prints the run's status."""
  try:
    snapshot = query_ray_status(ray_address, run_name, timeout_s=timeout_s)
  except StatusTimeout as e:
    print(f'ntkdd status: error: {e}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)   # Ray's exit hooks would wait on the connection attempt still under way
  except (status_lib.StatusQueryError, ImportError) as e:
    print(f'ntkdd status: error: {e}', file=sys.stderr)
    return 2
  status_client.show(snapshot, as_json)
  return 0
