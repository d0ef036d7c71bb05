"""Reaching a Ray cluster: find or start one, connect with its token, end ntkdd's actors.

`connect` joins the cluster `ray.init()` would find (RAY_ADDRESS, or the last `ray start` on
this machine), a HOST:PORT, or starts a private local Ray on loopback; `check_reachable` fails
at once for an address nobody serves (ray.init would retry it for minutes). Every ntkdd actor
lives in the namespace NAMESPACE.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from typing import Optional, Sequence

NAMESPACE = 'ntkdd'
INSTALL_HINT = ("the Ray launch type needs Ray on this machine and on every node of the "
                "cluster: pip install 'ntkdd[ray]'")


def import_ray():
  """The `ray` module, or an ImportError that says how to get it."""
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'{INSTALL_HINT} ({e})') from e
  return ray


def check_reachable(ray_address: Optional[str], timeout_s: float = 5.0) -> None:
  """ConnectionError unless something listens at a HOST:PORT address ('auto' and 'local' pass).

  `ray.init` retries an address nobody serves for minutes; this fails at once instead.
  """
  if not ray_address or ray_address in ('auto', 'local') or '://' in ray_address:
    return
  host, _, port = ray_address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--ray-address needs HOST:PORT, auto or local; got {ray_address!r}.')
  try:
    socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s).close()
  except OSError as e:
    raise ConnectionError(f'No Ray cluster answers at {ray_address}: {e}. Is its head node up '
                          f'(ray start --head), and is that its GCS port?') from e


def use_token_if_available(ray_address: Optional[str]) -> None:
  """Token authentication for an explicit HOST:PORT when a token is at hand (Ray >= 2.52).

  Ray turns it on by itself for a cluster found with 'auto' and for a new local one, but not
  for an address given explicitly, so `ntkdd status --ray-address HOST:PORT` would be refused
  by a cluster with tokens. This does what Ray does for 'auto' (a token sent to a cluster
  without tokens is ignored); RAY_AUTH_MODE, where set, decides instead.
  """
  if not ray_address or ray_address in ('auto', 'local') or 'RAY_AUTH_MODE' in os.environ:
    return
  try:
    from ray._private.authentication import authentication_token_setup as token_setup
  except ImportError:   # Ray < 2.52: no token authentication
    return
  try:
    token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
  except Exception as e:  # a private Ray API that may change: then RAY_AUTH_MODE=token is needed
    logging.debug('Ray token set-up skipped: %s', e)


def running_cluster_address() -> tuple[Optional[str], str]:
  """(HOST:PORT of the Ray cluster `ray.init()` would join, where it was found), or (None, why).

  As `ray.init()` looks: RAY_ADDRESS, else the cluster the last `ray start` on this machine
  began (Ray's temp dir, $RAY_TMPDIR or /tmp/ray); no local GCS process is guessed at.
  """
  env_address = os.environ.get('RAY_ADDRESS', '').strip()
  if env_address:
    return env_address, 'RAY_ADDRESS'
  try:
    from ray._private import services  # pylint: disable=import-outside-toplevel
    found = services.find_bootstrap_address(None)
  except Exception as e:  # a private Ray API: without it, no cluster is found
    logging.debug('Looking for a running Ray cluster failed: %s', e)
    found = None
  if found:
    return found, 'the cluster `ray start` began on this machine'
  return None, 'no RAY_ADDRESS and no cluster started with `ray start` on this machine'


def _default_address() -> str:
  """A running cluster's address if there is one that answers, else 'local' (logged)."""
  address, where = running_cluster_address()
  if address is not None:
    try:
      check_reachable(address)
    except (ConnectionError, ValueError) as e:
      if where == 'RAY_ADDRESS':   # the user named it: no silent fallback
        raise ConnectionError(f'RAY_ADDRESS={address} names no running Ray cluster ({e}). '
                              f'Unset it to start a private local Ray.') from e
      logging.warning('The last Ray cluster started on this machine (%s) does not answer: '
                      'starting a private local Ray for this command instead.', address)
      return 'local'
    logging.info('Ray: using the running cluster at %s (%s).', address, where)
    return address
  logging.info('Ray: no running cluster (%s): starting a private local Ray for this command '
               '(it ends with it; --ray-address HOST:PORT joins a cluster instead).', where)
  return 'local'


def connect(ray_address: Optional[str] = None, local_cpus: Optional[int] = None) -> bool:
  """Connects this process to Ray unless it already is.

  Args:
    ray_address: None (the default: a running cluster, found as `ray.init()` finds one, else
      a private local Ray, as `ray.init()` does; the log says which), 'auto' (the cluster
      started on this machine with `ray start`, found through RAY_ADDRESS or Ray's temp dir;
      an error if there is none), 'HOST:PORT' (a cluster's GCS address), or 'local' (start a
      private local Ray for this process, on loopback; ended by `ray.shutdown`).
    local_cpus: the CPUs of a private local Ray (default: Ray's choice).

  Returns:
    True if this call connected (the caller then calls `ray.shutdown()` when done).

  Raises:
    ConnectionError: no cluster at the address (the message names --ray-address).
  """
  ray = import_ray()
  if ray.is_initialized():
    return False
  address = _default_address() if ray_address in (None, '') else ray_address
  check_reachable(address)
  use_token_if_available(address)
  kwargs: dict = dict(namespace=NAMESPACE, logging_level=logging.WARNING)
  if address == 'local':
    kwargs.update(num_cpus=local_cpus, include_dashboard=False,
                  _node_ip_address='127.0.0.1')
  try:
    ray.init(address=address, **kwargs)
  except ConnectionError as e:
    # Ray's own hint names its CLI's --address flag; ntkdd's flag is --ray-address.
    hint = re.sub(r'(the )?`--address`( flag)?', '--ray-address', str(e))
    raise ConnectionError(f'No Ray cluster at --ray-address {address}: {hint} Start one with '
                          f'`ray start --head`, give its HOST:PORT, or leave --ray-address '
                          f'out for a private one on this machine.') from e
  return True


def cluster_address() -> str:
  """The GCS address (HOST:PORT) of the cluster this process is connected to."""
  return import_ray().get_runtime_context().gcs_address


def kill_actors(actors: Sequence) -> None:
  """Kills the actors for good (no restart); ignores the ones already gone."""
  ray = import_ray()
  for actor in actors:
    try:
      ray.kill(actor, no_restart=True)
    except Exception as e:  # gone already, or the connection is: nothing left to end
      logging.debug('ray.kill(%s): %s', actor, e)


def actor_node_ids(actors: Sequence, timeout_s: float = 30.0) -> list[str]:
  """The Ray node id each actor runs on."""
  ray = import_ray()
  refs = [a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
          for a in actors]
  return ray.get(refs, timeout=timeout_s)
