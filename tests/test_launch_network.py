"""Where a local Launchpad program's Courier ports live: a private network namespace, or a
refusal that says why and how to proceed, or an explicit opt-in that says what it exposes."""
import logging
import os
import subprocess
import sys

import pytest

from ntkdd.launch import cli, launchpad_program as lpp, private_network


def _no_namespace(monkeypatch, why='`unshare -n`: Operation not permitted'):
  monkeypatch.setattr(private_network, 'inside_private_namespace', lambda: False)
  monkeypatch.setattr(private_network, 'probe_unshare', lambda: (None, why))


def test_refused_without_a_namespace(monkeypatch):
  _no_namespace(monkeypatch)
  with pytest.raises(lpp.PrivateNetworkUnavailable) as refused:
    lpp.network_prefix()
  message = str(refused.value)
  assert 'Operation not permitted' in message          # why
  assert lpp.EXPOSE_FLAG in message and '--launch ray' in message   # how to proceed
  assert 'executes what its callers send' in message


def test_the_opt_in_says_what_it_exposes(monkeypatch, caplog):
  _no_namespace(monkeypatch)
  with caplog.at_level(logging.WARNING):
    assert lpp.network_prefix(expose_courier_ports=True) == []
  assert 'every network interface' in caplog.text and 'run code as user' in caplog.text


def test_a_caller_that_coordinates_must_be_inside(monkeypatch):
  monkeypatch.setattr(private_network, 'inside_private_namespace', lambda: False)
  monkeypatch.setattr(private_network, 'probe_unshare', lambda: (['unshare', '-n'], ''))
  assert lpp.network_prefix() == ['unshare', '-n']
  with pytest.raises(lpp.PrivateNetworkUnavailable, match='coordinates'):
    lpp.network_prefix(caller_coordinates=True)
  monkeypatch.setattr(private_network, 'inside_private_namespace', lambda: True)
  assert lpp.network_prefix() == [] and lpp.network_prefix(caller_coordinates=True) == []


def test_cli_kernel_refuses_with_one_message(monkeypatch, tmp_path, capsys):
  _no_namespace(monkeypatch)
  code = cli.main(['kernel', '--x1', str(tmp_path / 'x.npy'), '--out', str(tmp_path / 'k.npz'),
                   '--launch', 'launchpad', '--workers', '1'])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('ntkdd kernel: error: ') and len(err.splitlines()) == 1
  assert 'Operation not permitted' in err and lpp.EXPOSE_FLAG in err
  assert not (tmp_path / 'k.npz').exists()


def test_this_machine_makes_private_namespaces():
  """The tests of the Launchpad launch type rely on it (as the Ray tests do)."""
  prefix, why = private_network.probe_unshare()
  if prefix is None:
    pytest.skip(f'no private network namespace here: {why}')
  code = ('from ntkdd.launch import private_network as p; '
          'print(p.only_loopback(), p.inside_private_namespace())')
  done = private_network.run([sys.executable, '-c', code], prefix, timeout_s=120)
  assert done.returncode == 0 and done.output.strip().endswith('True True'), done.output
  assert done.leftover_pids == []


def test_the_namespace_guard_kills_only_its_namespace(tmp_path):
  prefix, why = private_network.probe_unshare()
  if prefix is None:
    pytest.skip(f'no private network namespace here: {why}')
  netns_file = tmp_path / 'netns'
  # A command that leaves a process behind in its namespace (a daemon of sorts).
  process = subprocess.Popen(
      prefix + ['bash', '-c', private_network.ENTER, 'enter', 'bash', '-c',
                'sleep 300 & echo started; wait'],
      env=dict(os.environ, NTKDD_NETNS_FILE=str(netns_file)), stdout=subprocess.PIPE,
      start_new_session=True)
  guard = private_network.NamespaceGuard(netns_file, process.pid)
  try:
    assert guard.acquire(timeout_s=30)
    assert process.stdout.readline().strip() == b'started'
    pids = private_network.namespace_pids(guard.netns)
    assert process.pid in pids and len(pids) == 2 and os.getpid() not in pids
  finally:
    left = guard.kill_all()
    process.wait(30)
  assert left == [] and not any(os.path.exists(f'/proc/{pid}') and
                                _state(pid) != 'Z' for pid in pids if pid != process.pid)


def _state(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[-1].split()[0]
  except OSError:
    return 'gone'

