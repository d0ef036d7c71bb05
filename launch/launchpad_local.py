"""Runs a Launchpad program on this machine (local_mp) under a launcher process of its own.

What it does, and why (Launchpad 0.5.2 on this stack):

* The launch happens in a separate launcher process (its own session, so its own process
  group), never in the caller. Launchpad's `WorkerManager` takes over SIGTERM/SIGINT/SIGQUIT/
  SIGALRM in the launching process, stops the whole program when any node exits non-zero (a
  killed kernel worker would end the run the coordinator is meant to survive), and after
  `--lp_termination_notice_secs` SIGKILLs its own process tree, the launcher included. In a
  launcher process of its own none of that touches the caller; the caller ends everything by
  signalling the launcher's process group (SIGTERM, then SIGKILL), by pid.
* `terminal='output_to_files'` needs no terminal, tmux or X (the default picks gnome-terminal,
  tmux or xterm when it finds one). Each node's output goes to `<log dir>/<group>/<index>`;
  that launcher reads its folder from the module global `_LOGGING_DIR` (set from
  $LAUNCHPAD_LOGGING_DIR at import), which the launcher sets before launching.
* Given a network prefix (`unshare -n`, see launchpad_program.network_prefix), the launcher and
  every node live in a private network namespace; `NamespaceGuard` kills what is left there.

Files: launchpad_processes.json (pids, the namespace, the nodes' addresses), launchpad_spec.json
(what the launcher builds) and launchpad_logs/ (each node's output, launcher.log).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from ntkdd.launch import nodes, private_network
from ntkdd.server import coordinator, run_dir as run_dir_lib



def _launcher_main(spec_path: str) -> None:
  """Runs in the launcher process: launch (local_mp), watch, then end every node."""
  spec = json.loads(Path(spec_path).read_text())
  logging.basicConfig(level=logging.INFO, format='%(asctime)s launcher %(message)s')
  from ntkdd.launch import launchpad_program   # builds the program (imports this module)
  lp = launchpad_program.import_launchpad()
  from launchpad.launch.run_locally import launch_local_output_to_files
  from launchpad.nodes.python import local_multi_processing
  launch_local_output_to_files._LOGGING_DIR = spec['log_dir']  # pylint: disable=protected-access
  program = launchpad_program.program_from_spec(spec)
  env = nodes.node_env(spec.get('env'))
  resources = {label: local_multi_processing.PythonProcess(env=env) for label in program.groups}
  manager = lp.launch(program, launch_type=lp.LaunchType.LOCAL_MULTI_PROCESSING,
                      terminal='output_to_files', local_resources=resources)
  # Launchpad's handlers (installed by lp.launch) would stop the program when any node exits
  # non-zero and finally SIGKILL this process tree; this launcher decides instead.
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(sig, lambda *_: stop.set())
  signal.signal(signal.SIGALRM, signal.SIG_IGN)
  signal.alarm(0)
  # The manager names each process '<group>/<index>'; gather them by group, in index order.
  titled = sorted(manager._active_workers.items(),  # pylint: disable=protected-access
                  key=lambda kv: (kv[0].split('/')[0], int(kv[0].rsplit('/', 1)[-1])
                                  if kv[0].rsplit('/', 1)[-1].isdigit() else 0))
  by_group: dict = {}
  for title, procs in titled:
    by_group.setdefault(title.split('/')[0], []).extend(procs)
  info = {'launcher': os.getpid(), 'netns': os.readlink('/proc/self/ns/net'),
          'network': spec.get('network', 'host'),
          'nodes': {label: [p.pid for p in procs] for label, procs in by_group.items()},
          'addresses': {label: [n.courier_address.resolve() for n in program.groups[label]]
                        for label in program.groups}}
  run_dir_lib.write_json(Path(spec['processes_file']), info)
  watched = by_group.get(launchpad_program.COORDINATOR) or []
  while not stop.is_set():
    if watched and all(p.poll() is not None for p in watched):
      break
    stop.wait(0.2)
  code = 0
  # The coordinator first (it checkpoints on SIGTERM and needs its workers for the step it is
  # in), then the workers; whatever outlives the grace period is killed.
  deadline = time.monotonic() + float(spec.get('stop_grace_s', 60))
  others = [p for label, procs in by_group.items() if label != launchpad_program.COORDINATOR
            for p in procs]
  for group in [watched, others]:
    for p in group:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    while time.monotonic() < deadline and any(p.poll() is None for p in group):
      time.sleep(0.1)
  for p in (p for procs in by_group.values() for p in procs):
    if p.poll() is None:
      p.kill()
      p.wait()
  if watched:
    code = watched[0].returncode or 0
  logging.info('Launcher done; coordinator exit code %s.', code)
  sys.stdout.flush()
  os._exit(0 if code == 0 else 1)   # skips Launchpad's atexit manager.wait()


class LocalProgram:
  """A Launchpad program running under a launcher process started by this one.

  Use as a context manager: leaving it ends the launcher's process group (every node).
  """

  def __init__(self, spec: dict, base_dir: Path, python: Optional[str] = None,
               prefix: Sequence[str] = ()):
    self.base_dir = Path(base_dir)
    self.log_dir = Path(spec['log_dir'])
    self.log_dir.mkdir(parents=True, exist_ok=True)
    self.processes_file = Path(spec['processes_file'])
    self.processes_file.unlink(missing_ok=True)
    spec = dict(spec, network='private' if prefix else spec.get('network', 'host'))
    spec_path = self.base_dir / run_dir_lib.LAUNCHPAD_SPEC
    run_dir_lib.write_json(spec_path, spec)
    self._log = open(self.log_dir / run_dir_lib.LAUNCHER_LOG, 'ab')
    code = ('import sys; from ntkdd.launch import launchpad_local as m; '
            'm._launcher_main(sys.argv[1])')
    argv = [python or sys.executable, '-c', code, str(spec_path)]
    env = None
    netns_file = self.log_dir / run_dir_lib.LAUNCHPAD_NETNS
    netns_file.unlink(missing_ok=True)
    if prefix:   # `unshare -n` execs (no fork), so the pid stays the launcher's
      argv = list(prefix) + ['bash', '-c', private_network.ENTER, 'enter'] + argv
      env = dict(os.environ, NTKDD_NETNS_FILE=str(netns_file))
    self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
    self.pid = self.process.pid    # also the process group id of every node
    self._namespace = None
    if prefix:
      self._namespace = private_network.NamespaceGuard(netns_file, self.pid)
      if not self._namespace.acquire(timeout_s=30):
        self.stop()
        raise coordinator.CoordinatorFailed(
            f'The Launchpad launcher did not enter its private network namespace.\n'
            f'{self.log_tail()}')

  def processes(self, timeout_s: float = 120.0) -> dict:
    """{'launcher': pid, 'nodes': {group: [pids]}, 'addresses': {group: [HOST:PORT]}}."""
    deadline = time.monotonic() + timeout_s
    while True:
      info = run_dir_lib.read_json(self.processes_file)
      if info is not None:
        return info
      if self.process.poll() is not None:
        raise coordinator.CoordinatorFailed(
            f'The Launchpad launcher exited (code {self.process.returncode}) before starting '
            f'the nodes.\n{self.log_tail()}')
      if time.monotonic() > deadline:
        raise TimeoutError(f'The Launchpad program did not start within {timeout_s:g} s.\n'
                           f'{self.log_tail()}')
      time.sleep(0.1)

  def running(self) -> bool:
    return self.process.poll() is None

  def log_tail(self, lines: int = 30) -> str:
    """The last lines of the launcher's and each node's log."""
    parts = []
    for path in sorted(p for p in self.log_dir.rglob('*') if p.is_file()):
      try:
        text = path.read_text(errors='replace').splitlines()[-lines:]
      except OSError:
        continue
      parts.append(f'--- {path.relative_to(self.log_dir)} ---\n' + '\n'.join(text))
    return '\n'.join(parts)

  def stop(self, grace_s: float = 60.0) -> None:
    """Asks the launcher to end the program; then SIGKILLs its whole process group."""
    try:
      if self.process.poll() is None:
        os.kill(self.pid, signal.SIGTERM)
        try:
          self.process.wait(timeout=grace_s + 5)
        except subprocess.TimeoutExpired:
          pass
    finally:
      try:
        os.killpg(self.pid, signal.SIGKILL)   # anything left in the group, by its id
      except (ProcessLookupError, PermissionError):
        pass
      if self.process.poll() is None:
        self.process.kill()
      self.process.wait()
      if self._namespace is not None:   # anything left in the run's namespace, by pid
        self._namespace.kill_all()
      self._log.close()

  def __enter__(self) -> 'LocalProgram':
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
