"""The ntkdd command line, end to end on tiny data."""
import json
import logging
import sys

import numpy as np
import pytest

from ntkdd.launch import cli, flag_uses


def test_kernel_command_writes_ntk_and_nngp_and_workers_agree(tmp_path):
  x = np.random.default_rng(0).normal(size=(5, 8, 8, 2)).astype(np.float32)
  np.save(tmp_path / 'x.npy', x)
  base = ['kernel', '--arch', 'convnet', '--depth', '1', '--x1', str(tmp_path / 'x.npy')]
  assert cli.main(base + ['--out', str(tmp_path / 'k.npz')]) == 0
  assert cli.main(base + ['--out', str(tmp_path / 'k2.npz'), '--workers', '2',
                          '--block', '2']) == 0
  with np.load(tmp_path / 'k.npz') as a, np.load(tmp_path / 'k2.npz') as b:
    assert a['ntk'].shape == (5, 5) and a['nngp'].shape == (5, 5)
    np.testing.assert_allclose(a['ntk'], b['ntk'], rtol=1e-5)
    np.testing.assert_allclose(a['ntk'], a['ntk'].T, rtol=1e-6)


def test_kernel_command_rejects_flat_input_for_convnet(tmp_path, capsys):
  np.save(tmp_path / 'x.npy', np.zeros((3, 10), np.float32))
  with pytest.raises(SystemExit, match='NHWC'):
    cli.main(['kernel', '--arch', 'convnet', '--x1', str(tmp_path / 'x.npy'),
              '--out', str(tmp_path / 'k.npz')])


def test_distill_evaluate_show(tiny_npz, tmp_path, capsys, caplog):
  caplog.set_level(logging.INFO)
  run = tmp_path / 'run'
  assert cli.main(['distill', '--dataset', tiny_npz, '--data-dir', '.', '--ipc', '2',
                   '--steps', '6', '--target-batch', '12', '--eval-every', '3', '--lr', '0.05',
                   '--learn-labels', '--no-progress', '--out', str(run),
                   '--workers', '2', '--block', '4']) == 0
  out = capsys.readouterr().out
  assert 'KRR test accuracy' in out and str(run) in out
  assert cli.main(['evaluate', '--support', str(run / 'support.npz'), '--data-dir', '.',
                   '--transfer', 'fc', '--train-steps', '20', '--seeds', '2',
                   '--baselines']) == 0
  report = json.loads((run / 'evaluation.json').read_text())
  assert len(report['distilled']['transfer']['fc']['accuracies']) == 2
  assert 0 <= report['random_real']['krr']['test_accuracy'] <= 1
  # The KRR kernels on two workers (--workers was silently ignored by evaluate before): the
  # same accuracies; --no-krr trains the networks only.
  assert cli.main(['evaluate', '--support', str(run / 'support.npz'), '--data-dir', '.',
                   '--transfer', '', '--baselines', '--workers', '2', '--block', '3',
                   '--out', str(tmp_path / 'workers.json')]) == 0
  on_workers = json.loads((tmp_path / 'workers.json').read_text())
  for name in ('distilled', 'random_real'):
    assert on_workers[name]['krr']['test_accuracy'] == report[name]['krr']['test_accuracy']
  capsys.readouterr()
  assert cli.main(['evaluate', '--support', str(run / 'support.npz'), '--data-dir', '.',
                   '--transfer', 'fc', '--train-steps', '20', '--seeds', '1', '--no-krr',
                   '--out', str(tmp_path / 'no-krr.json')]) == 0
  assert 'not computed' in capsys.readouterr().out
  assert 'fc network 1/1 (seed 0): test accuracy' in caplog.text   # progress per network
  transfer_only = json.loads((tmp_path / 'no-krr.json').read_text())
  assert transfer_only['distilled']['krr'] is None
  assert len(transfer_only['distilled']['transfer']['fc']['accuracies']) == 1
  for extra, named in ((['--workers', '2'], '--workers'), (['--transfer', ''], '--transfer')):
    assert cli.main(['evaluate', '--support', str(run / 'support.npz'), '--data-dir', '.',
                     '--no-krr', *extra]) == 2
    assert named in capsys.readouterr().err
  assert cli.main(['show', str(run)]) == 0
  shown = capsys.readouterr().out
  assert 'KIP' in shown and '6 / 6' in shown


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
  code = cli.main(['distill', '--dataset', 'imagenet', '--data-dir', str(tmp_path),
                   '--out', str(tmp_path / 'run'), '--no-progress'])
  err = capsys.readouterr().err
  assert code == 2 and 'imagenet' in err and 'Traceback' not in err
  code = cli.main(['distill', '--dataset', 'mnist', '--data-dir', str(tmp_path), '--reg', '0',
                   '--out', str(tmp_path / 'run'), '--no-progress'])
  assert code == 2 and '--reg' in capsys.readouterr().err


def test_distill_rcig_from_the_command_line(tiny_npz, tmp_path, capsys):
  run = tmp_path / 'rcig'
  assert cli.main(['distill', '--algorithm', 'rcig', '--dataset', tiny_npz, '--data-dir', '.',
                   '--ipc', '2', '--steps', '2', '--depth', '1',
                   '--width', '8', '--pool-size', '2', '--inner-steps', '2', '--hinv-steps', '2',
                   '--rcig-target-batch', '12', '--no-progress', '--out', str(run)]) == 0
  assert 'RCIG' in capsys.readouterr().out
  with np.load(run / 'support.npz') as f:
    assert f['images'].shape == (6, 8, 8, 1)


@pytest.mark.parametrize('channels, expected', [(3, 'channel_zca'), (1, 'auto')])
def test_rcig_auto_preprocessing_is_the_papers(tmp_path, capsys, channels, expected):
  """RCIG's `auto` is its paper's preprocessing: the channel ZCA for RGB data, per-channel
  standardisation (KIP's `auto`) for grayscale; config.json records which."""
  from conftest import make_tiny_npz
  data = make_tiny_npz(tmp_path / 'tiny.npz', channels=channels)
  run = tmp_path / 'rcig'
  assert cli.main(['distill', '--algorithm', 'rcig', '--dataset', str(data), '--data-dir', '.',
                   '--ipc', '1', '--steps', '1', '--depth', '1', '--width', '4',
                   '--pool-size', '1', '--inner-steps', '1', '--hinv-steps', '1',
                   '--rcig-target-batch', '6', '--eval-every', '0', '--no-progress',
                   '--out', str(run)]) == 0
  config = json.loads((run / 'config.json').read_text())
  assert config['flags']['preprocess'] == expected
  assert config['dataset']['preprocess'] == ('channel_zca' if channels == 3 else 'standardize')


@pytest.mark.parametrize('arch, channels, expected', [
    ('convnet', 3, 'channel_zca'), ('convnet', 1, 'channel_zca'), ('fc', 3, 'standardize')])
def test_kip_auto_preprocessing_follows_the_kernel(tmp_path, capsys, arch, channels, expected):
  """A new KIP run's `auto` is the measured choice for its kernel (choices.AUTO_KERNEL_PREPROCESS),
  written into config.json by name; on grayscale data the channel ZCA is standardisation."""
  from conftest import make_tiny_npz
  data = make_tiny_npz(tmp_path / 'tiny.npz', channels=channels)
  run = tmp_path / 'kip'
  assert cli.main(['distill', '--dataset', str(data), '--data-dir', '.', '--arch', arch,
                   '--depth', '1', '--ipc', '1', '--steps', '1', '--target-batch', '6',
                   '--eval-every', '1', '--no-progress', '--out', str(run)]) == 0
  config = json.loads((run / 'config.json').read_text())
  assert config['flags']['preprocess'] == expected
  assert config['dataset']['preprocess'] == expected


def test_kernel_preprocess_rules():
  from ntkdd.server import jobs
  assert jobs.kernel_preprocess('auto', 'convnet') == 'channel_zca'
  assert jobs.kernel_preprocess('auto', 'fc') == 'standardize'
  assert jobs.kernel_preprocess('kip_zca', 'convnet') == 'kip_zca'
  assert jobs.kernel_preprocess('auto', 'convnet', saved='standardize') == 'standardize'
  # An older run's 'auto' (standardisation) resumes under 'auto' or its explicit name.
  assert jobs.kernel_preprocess('auto', 'convnet', saved='auto') == 'auto'
  assert jobs.kernel_preprocess('standardize', 'convnet', saved='auto') == 'auto'
  assert jobs.kernel_preprocess('channel_zca', 'convnet', saved='auto') == 'channel_zca'


def test_resume_keeps_the_preprocessing_an_auto_run_was_made_with(tmp_path, capsys):
  """A run whose config.json says 'auto' (made before 'auto' chose per kernel, when it meant
  standardisation) resumes on the same data, not on the channel ZCA a new run would get."""
  from conftest import make_tiny_npz
  data = make_tiny_npz(tmp_path / 'tiny.npz', channels=3)
  run = tmp_path / 'kip'
  args = ['distill', '--dataset', str(data), '--data-dir', '.', '--arch', 'convnet', '--depth',
          '1', '--ipc', '1', '--target-batch', '6', '--eval-every', '1', '--checkpoint-every',
          '1', '--no-progress', '--out', str(run), '--preprocess', 'standardize']
  assert cli.main(args + ['--steps', '1']) == 0
  config = json.loads((run / 'config.json').read_text())
  config['flags']['preprocess'] = 'auto'   # as an older ntkdd wrote it
  (run / 'config.json').write_text(json.dumps(config))
  assert cli.main(args[:-2] + ['--steps', '2', '--resume']) == 0
  config = json.loads((run / 'config.json').read_text())
  assert config['flags']['preprocess'] == 'auto'
  assert config['dataset']['preprocess'] == 'standardize'


# -- Flags a mode does not use are refused (one line: the flag, the mode, the fix). ------------

@pytest.mark.parametrize('mode, extra, flag', [
    (['--algorithm', 'ls'], ['--lr-schedule', 'cosine'], '--lr-schedule'),
    (['--algorithm', 'rcig'], ['--learn-labels'], '--learn-labels'),
    (['--algorithm', 'rcig'], ['--loss', 'platt'], '--loss'),
    (['--algorithm', 'ls'], ['--loss', 'mse'], '--loss'),
    (['--algorithm', 'rcig'], ['--target-batch', '12'], '--target-batch'),
    (['--algorithm', 'rcig'], ['--arch', 'convnet'], '--arch'),
    (['--algorithm', 'rcig'], ['--kernel', 'nngp'], '--kernel'),            # no workers: no KRR
    (['--algorithm', 'rcig', '--workers', '2', '--eval-every', '0'], [], '--workers'),
    (['--algorithm', 'rcig', '--launch', 'launchpad', '--workers', '2', '--eval-every', '0'], [],
     '--launch'),
    (['--algorithm', 'kip'], ['--width', '8'], '--width'),
    (['--algorithm', 'rcig', '--eval-every', '0'], ['--eval-models', '3'], '--eval-models'),
    (['--algorithm', 'rcig', '--eval-every', '0'], ['--eval-test-size', '9'], '--eval-test-size'),
    (['--algorithm', 'kip'], ['--rcig-flip', 'on'], '--rcig-flip'),
    (['--algorithm', 'kip'], ['--ls-rcond', '1e-3'], '--ls-rcond'),
    (['--algorithm', 'ls'], ['--steps', '10'], '--steps'),
    (['--algorithm', 'ls'], ['--lr', '0.1'], '--lr'),
    (['--algorithm', 'ls'], ['--ema-decay', '0.99'], '--ema-decay'),
    (['--algorithm', 'ls'], ['--checkpoint-every', '5'], '--checkpoint-every'),
    (['--algorithm', 'ls'], ['--pool-size', '3'], '--pool-size'),
    (['--algorithm', 'kip'], ['--block', '8'], '--block'),                   # --workers 0
    (['--algorithm', 'kip'], ['--ray-address', 'local'], '--ray-address'),
    (['--algorithm', 'kip', '--workers', '2'], ['--expose-courier-ports'],
     '--expose-courier-ports'),
    (['--algorithm', 'kip', '--workers', '2'], ['--pin-workers'], '--pin-workers'),  # threads
    (['--algorithm', 'kip', '--init-support', 'set.npz'], ['--init', 'noise'], '--init'),
    (['--algorithm', 'kip'], ['--rcig-init-log-temp', '2'], '--rcig-init-log-temp'),
])
def test_flags_a_mode_does_not_use_are_refused(tiny_npz, tmp_path, capsys, mode, extra, flag):
  run = tmp_path / 'run'
  code = cli.main(['distill', '--dataset', tiny_npz, '--data-dir', '.', '--out', str(run),
                   '--no-progress', *mode, *extra])
  err = capsys.readouterr().err
  assert code == 2, err
  assert f'{flag} is not used by --algorithm' in err and f'Drop {flag}' in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  assert not run.exists()   # refused before anything ran


@pytest.mark.parametrize('extra, flag', [
    (['--block', '8'], '--block'),
    (['--ray-address', 'local'], '--ray-address'),
    (['--workers', '1', '--expose-courier-ports'], '--expose-courier-ports'),
    (['--pin-workers'], '--pin-workers'),
])
def test_kernel_refuses_launch_flags_its_launch_does_not_use(tmp_path, capsys, extra, flag):
  np.save(tmp_path / 'x.npy', np.ones((3, 4), np.float32))
  out = tmp_path / 'k.npz'
  code = cli.main(['kernel', '--arch', 'fc', '--x1', str(tmp_path / 'x.npy'), '--out', str(out),
                   *extra])
  err = capsys.readouterr().err
  assert code == 2 and f'{flag} is not used by --launch inprocess' in err, err
  assert not out.exists()


def test_flags_a_mode_uses_are_accepted():
  """The refusal looks at the flags given, and at the mode: the same flag passes where used."""
  args = cli._parser().parse_args(['distill', '--out', 'x', '--algorithm', 'rcig', '--workers',
                                   '2', '--kernel', 'nngp', '--reg', '1e-4', '--block', '8',
                                   '--width', '8', '--eval-every', '5'])
  given = cli.given_flags(['distill', '--out', 'x', '--algorithm', 'rcig', '--workers', '2',
                           '--kernel', 'nngp', '--reg', '1e-4', '--block', '8', '--width', '8',
                           '--eval-every', '5'])
  assert {'kernel', 'reg', 'block', 'width', 'workers', 'eval_every'} <= given
  assert 'lr_schedule' not in given and 'arch' not in given
  flag_uses.refuse_unused_flags(args, given)   # RCIG with workers evaluates KRR: all used
  with pytest.raises(ValueError, match='--kernel is not used'):
    flag_uses.refuse_unused_flags(cli._parser().parse_args(
        ['distill', '--out', 'x', '--algorithm', 'rcig', '--kernel', 'nngp']), {'kernel'})


def test_rcig_without_optax_says_how_to_install_it(tiny_npz, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'optax', None)   # `import optax` raises ImportError
  code = cli.main(['distill', '--algorithm', 'rcig', '--dataset', tiny_npz, '--data-dir', '.',
                   '--ipc', '1', '--steps', '1', '--no-progress', '--out', str(tmp_path / 'r')])
  err = capsys.readouterr().err
  assert code == 2 and 'optax' in err and 'pip install optax' in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('algorithm', ['kip', 'rcig'])
def test_a_missing_init_support_is_one_line_before_any_work(tiny_npz, tmp_path, capsys,
                                                            algorithm):
  code = cli.main(['distill', '--algorithm', algorithm, '--dataset', tiny_npz, '--data-dir', '.',
                   '--ipc', '1', '--steps', '1', '--no-progress', '--out', str(tmp_path / 'r'),
                   '--init-support', str(tmp_path / 'nowhere.npz')])
  err = capsys.readouterr().err
  assert code == 2 and '--init-support' in err and 'does not exist' in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / 'r').exists()


def test_flag_defaults_are_the_configs_defaults():
  """Left unset, `ntkdd distill`'s flags give the configs' own defaults (DistillConfig's for
  KIP; RcigConfig's for RCIG, but for the shared --checkpoint-every), so a default changed
  next to its config cannot drift from the command line's."""
  import dataclasses
  from ntkdd.common import rcig
  from ntkdd.server import distill
  args = cli._parser().parse_args(['distill', '--out', 'x'])
  cli._fill_defaults(args)
  assert cli._distill_config(args) == distill.DistillConfig()
  args = cli._parser().parse_args(['distill', '--out', 'x', '--algorithm', 'rcig'])
  args.given = {'algorithm', 'out'}
  cli._fill_defaults(args)
  assert cli._rcig_config(args) == dataclasses.replace(
      rcig.RcigConfig(), checkpoint_every=args.checkpoint_every)
  # RCIG's cosine schedule decays over the run's --steps.
  args = cli._parser().parse_args(['distill', '--out', 'x', '--algorithm', 'rcig', '--steps',
                                   '700', '--lr-schedule', 'cosine'])
  args.given = {'algorithm', 'out', 'steps', 'lr_schedule'}
  cli._fill_defaults(args)
  assert cli._rcig_config(args).lr_decay_steps == 700
