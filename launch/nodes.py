"""What every launch type gives the processes it starts: their environment, a worker's arch."""
from __future__ import annotations

from typing import Any, Optional

# Several workers (and the coordinator) sharing a GPU must not each grab 75% of its memory.
NODE_ENV = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false', 'TF_CPP_MIN_LOG_LEVEL': '2'}


def node_env(extra: Optional[dict] = None) -> dict:
  """NODE_ENV plus `extra` (values as strs): the environment of a worker or coordinator."""
  env = dict(NODE_ENV)
  env.update({k: str(v) for k, v in (extra or {}).items()})
  return env


def arch_dict(arch: Any) -> dict:
  """An `Architecture` (or its dict) as the dict a `KernelWorker` is built from."""
  return arch.to_dict() if hasattr(arch, 'to_dict') else dict(arch)
