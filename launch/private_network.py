"""Run a command in a network namespace of its own, where only loopback exists.

Ray advertises the machine's non-loopback address even when told 127.0.0.1, so a local Ray
started by a test or a benchmark would listen beyond this machine. Inside `unshare -n`
(root) or `unshare -rn` (a user namespace) only `lo` exists, every connection stays on
127.0.0.1, and the namespace names exactly which processes to kill afterwards.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

# Brings loopback up, records the namespace (to find its processes later), runs the command.
_ENTER = 'ip link set lo up || exit 20; readlink /proc/self/ns/net > "$NTKDD_NETNS_FILE"; ' \
         'exec "$@"'


def only_loopback() -> bool:
  """True when this process's network namespace has no interface but `lo`."""
  # /proc/net/dev follows the namespace; /sys/class/net shows the one sysfs was mounted in.
  try:
    lines = Path('/proc/net/dev').read_text().splitlines()[2:]
  except OSError:
    return False
  return {line.split(':')[0].strip() for line in lines} <= {'lo'}


def unshare_prefix() -> Optional[list]:
  """`unshare -n` (or `-rn`, in a user namespace) if this machine allows it, else None."""
  if not shutil.which('unshare') or not shutil.which('ip'):
    return None
  for command in (['unshare', '-n'], ['unshare', '-rn']):
    try:
      if subprocess.run(command + ['ip', 'link', 'set', 'lo', 'up'], capture_output=True,
                        timeout=20).returncode == 0:
        return command
    except (OSError, subprocess.TimeoutExpired):
      continue
  return None


def namespace_pids(netns: str) -> list:
  """Every process in network namespace `netns` (e.g. 'net:[4026532177]')."""
  pids = []
  for entry in Path('/proc').iterdir():
    if entry.name.isdigit():
      try:
        if os.readlink(entry / 'ns' / 'net') == netns:
          pids.append(int(entry.name))
      except OSError:
        continue
  return pids


def kill_namespace(netns: str, timeout_s: float = 10.0) -> list:
  """SIGKILL every process of `netns` until none is left; the pids still alive (normally [])."""
  # `ray stop` would pick processes by name on the whole machine, other clusters included;
  # the namespace tells exactly which ones are ours.
  deadline = time.monotonic() + timeout_s
  while True:
    pids = namespace_pids(netns)
    if not pids or time.monotonic() > deadline:
      return pids
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.1)


class Finished:
  """How a command run in a private network ended."""

  def __init__(self, returncode, output: str, leftover_pids: list):
    self.returncode = returncode     # an int, or 'timeout'
    self.output = output             # stdout and stderr together
    self.leftover_pids = leftover_pids


def run(argv: Sequence[str], prefix: Sequence[str], timeout_s: float,
        env: Optional[dict] = None, cwd: Optional[str] = None, capture: bool = True) -> Finished:
  """Runs `argv` under `prefix` (from unshare_prefix()) with only loopback, within `timeout_s`;
  afterwards every process left in that namespace is killed by pid. capture=False lets the
  output through to this process's stdout and stderr (Finished.output is then empty)."""
  netns_file = Path(tempfile.mkdtemp(prefix='ntkdd-netns-')) / 'netns'
  env = dict(os.environ if env is None else env, NTKDD_NETNS_FILE=str(netns_file))
  process = subprocess.Popen(list(prefix) + ['bash', '-c', _ENTER, 'enter', *argv], env=env,
                             cwd=cwd, stdout=subprocess.PIPE if capture else None,
                             stderr=subprocess.STDOUT if capture else None,
                             start_new_session=True)
  try:
    output, _ = process.communicate(timeout=timeout_s)
    code = process.returncode
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    code = 'timeout'
  leftover = []
  if netns_file.exists():
    leftover = kill_namespace(netns_file.read_text().strip())
  shutil.rmtree(netns_file.parent, ignore_errors=True)
  return Finished(code, (output or b'').decode(errors='replace'), leftover)
