"""Run a command in a network namespace of its own, where only loopback exists.

Ray advertises the machine's non-loopback address even when told 127.0.0.1, so a local Ray
started by a test or a benchmark would listen beyond this machine; Courier servers (the local
Launchpad launch type, see launchpad_program) listen on every interface and execute what their
callers send, so a local program's launcher and nodes always run here. Inside `unshare -n`
(root) or `unshare -rn` (a user namespace) only `lo` exists, every connection stays on
127.0.0.1, and the namespace names exactly which processes to kill afterwards.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

# Brings loopback up, records the namespace (to find its processes later), runs the command.
ENTER = 'ip link set lo up || exit 20; readlink /proc/self/ns/net > "$NTKDD_NETNS_FILE"; ' \
         'exec "$@"'


def only_loopback() -> bool:
  """True when this process's network namespace has no interface but `lo`."""
  # /proc/net/dev follows the namespace; /sys/class/net shows the one sysfs was mounted in.
  try:
    lines = Path('/proc/net/dev').read_text().splitlines()[2:]
  except OSError:
    return False
  return {line.split(':')[0].strip() for line in lines} <= {'lo'}


def inside_private_namespace() -> bool:
  """True when this process runs in a namespace that ENTER made (this module's `run`, a local
  Launchpad launcher) and only loopback exists there. A host that merely has no interface but
  `lo` does not count: other users of the machine share its loopback."""
  netns_file = os.environ.get('NTKDD_NETNS_FILE')
  if not netns_file or not only_loopback():
    return False
  try:
    return Path(netns_file).read_text().strip() == os.readlink('/proc/self/ns/net')
  except OSError:
    return False


def probe_unshare() -> tuple[Optional[list], str]:
  """(`unshare -n` or `unshare -rn` if this machine allows one, else None; why not, or '')."""
  missing = [tool for tool in ('unshare', 'ip') if not shutil.which(tool)]
  if missing:
    return None, f"{' and '.join(missing)} not found (util-linux and iproute2 provide them)"
  problems = []
  for command in (['unshare', '-n'], ['unshare', '-rn']):
    try:
      done = subprocess.run(command + ['ip', 'link', 'set', 'lo', 'up'], capture_output=True,
                            timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
      problems.append(f"`{' '.join(command)}`: {e}")
      continue
    if done.returncode == 0:
      return command, ''
    problems.append(f"`{' '.join(command)}`: "
                    f"{done.stderr.decode(errors='replace').strip() or done.returncode}")
  return None, '; '.join(problems)


def unshare_prefix() -> Optional[list]:
  """`unshare -n` (or `-rn`, in a user namespace) if this machine allows it, else None."""
  return probe_unshare()[0]


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


class NamespaceGuard:
  """The network namespace a started process enters (via ENTER), held open by a file
  descriptor: while held, its id cannot pass to a namespace made later by someone else, so
  `kill_all` kills only processes of this one."""

  def __init__(self, netns_file: Path, pid: int):
    self.netns_file, self.pid = Path(netns_file), pid
    self.netns: Optional[str] = None
    self._fd: Optional[int] = None
    self._lock = threading.Lock()

  def acquire(self, timeout_s: float = 30.0) -> bool:
    """Waits until the process has entered its namespace and holds that; False if it ended
    (or did not get there) first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      with self._lock:
        if self._fd is not None:
          return True
        try:
          written = self.netns_file.read_text().strip()
        except OSError:
          written = ''
        if not written and not os.path.exists(f'/proc/{self.pid}/ns/net'):
          return False       # ended (or a zombie) before entering a namespace
        if written:
          try:
            fd = os.open(f'/proc/{self.pid}/ns/net', os.O_RDONLY)
          except OSError:
            return False     # the process is gone: nothing to hold
          if os.readlink(f'/proc/self/fd/{fd}') == written:
            self._fd, self.netns = fd, written
            return True
          os.close(fd)       # still the old namespace (or another process by now)
          return False
      time.sleep(0.02)
    return False

  def kill_all(self, timeout_s: float = 10.0) -> list:
    """SIGKILLs every process left in the namespace, then lets it go; the pids that would not
    die (normally []). Does nothing if the namespace was never held."""
    with self._lock:
      if self._fd is None:
        return []
      try:
        return kill_namespace(self.netns, timeout_s)
      finally:
        os.close(self._fd)
        self._fd = None


class Finished:
  """How a command run in a private network ended."""

  def __init__(self, returncode, output: str, leftover_pids: list):
    self.returncode = returncode     # an int, or 'timeout'
    self.output = output             # stdout and stderr together
    self.leftover_pids = leftover_pids


def run(argv: Sequence[str], prefix: Sequence[str], timeout_s: Optional[float],
        env: Optional[dict] = None, cwd: Optional[str] = None, capture: bool = True,
        new_session: bool = True) -> Finished:
  """Runs `argv` under `prefix` (from unshare_prefix()) with only loopback, within `timeout_s`
  (None: no limit); afterwards every process left in that namespace is killed by pid.
  capture=False lets the output through to this process's stdout and stderr (Finished.output
  is then empty). new_session=False keeps the command in this process group, so a terminal's
  Ctrl-C reaches it directly (this process ignores SIGINT meanwhile and passes SIGTERM on)."""
  netns_file = Path(tempfile.mkdtemp(prefix='ntkdd-netns-')) / 'netns'
  env = dict(os.environ if env is None else env, NTKDD_NETNS_FILE=str(netns_file))
  process = subprocess.Popen(list(prefix) + ['bash', '-c', ENTER, 'enter', *argv], env=env,
                             cwd=cwd, stdout=subprocess.PIPE if capture else None,
                             stderr=subprocess.STDOUT if capture else None,
                             start_new_session=new_session)
  guard = NamespaceGuard(netns_file, process.pid)
  holder = threading.Thread(target=guard.acquire, daemon=True, name='ntkdd-netns-guard')
  holder.start()
  previous = {}
  if not new_session:
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous[signal.SIGTERM] = signal.signal(
        signal.SIGTERM, lambda signum, _: process.send_signal(signum))
  try:
    output, _ = process.communicate(timeout=timeout_s)
    code = process.returncode
  except subprocess.TimeoutExpired:
    if new_session:
      os.killpg(process.pid, signal.SIGKILL)
    else:
      process.kill()
    output, _ = process.communicate()
    code = 'timeout'
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  holder.join()
  leftover = guard.kill_all()
  shutil.rmtree(netns_file.parent, ignore_errors=True)
  return Finished(code, (output or b'').decode(errors='replace'), leftover)
