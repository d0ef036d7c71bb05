"""`ntkdd evaluate --protocol`: the papers' training protocols (KIP's, RCIG's) by name, shortened
explicitly by `with_steps`, flags a protocol does not use refused, the default protocol as
before. Tiny arrays and a few training steps only."""
import dataclasses
import json
import types

import numpy as np
import pytest

from conftest import make_tiny_npz
from ntkdd.common import architectures, augment, train
from ntkdd.common.choices import EVAL_PROTOCOLS, PAPER_PROTOCOLS
from ntkdd.launch import cli, flag_uses
from ntkdd.server import evaluate

pytest.importorskip('optax')

CLASSES = 3


def _presets():
  return {'kip': train.kip_protocol(), 'rcig': train.rcig_protocol(10),
          'rcig_ntk': train.rcig_protocol(10, learning_rate=1e-3),
          'rcig_large': train.rcig_protocol(40),
          'rcig_augmented': train.rcig_protocol(10, augmentations='crop_cutout')}


def _support_and_data(images: int = 10, side: int = 8, seed: int = 0):
  """A support set of `images` noisy class templates and a test split of the same kind, in the
  shape `transfer_accuracy` reads (`distill.PreparedData`'s fields it uses)."""
  rng = np.random.default_rng(seed)
  templates = rng.normal(size=(CLASSES, side, side, 1)).astype(np.float32)

  def split(n):
    ids = np.arange(n) % CLASSES
    return templates[ids] + 0.3 * rng.normal(size=(n, side, side, 1)).astype(np.float32), ids

  x_support, ids = split(images)
  x_test, y_test = split(12)
  labels = np.eye(CLASSES, dtype=np.float32)[ids] - 1.0 / CLASSES
  support = evaluate.SupportSet(x_support, labels, ids.astype(np.int32))
  prepared = types.SimpleNamespace(x_train=x_support, x_test=x_test, y_test=y_test,
                                   num_classes=CLASSES)
  return support, prepared


# -- The presets by name, and their rescaling. --------------------------------------------------

def test_the_protocol_names_are_one_tuple_and_the_cli_offers_them():
  assert EVAL_PROTOCOLS == ('ntkdd',) + PAPER_PROTOCOLS and set(PAPER_PROTOCOLS) == {'kip', 'rcig'}
  args = cli._parser().parse_args(['evaluate', '--support', 's.npz'])
  assert args.protocol == 'ntkdd'
  for name in EVAL_PROTOCOLS:
    assert cli._parser().parse_args(['evaluate', '--support', 's.npz', '--protocol',
                                     name]).protocol == name


def test_paper_protocol_returns_the_presets():
  assert train.paper_protocol('kip', 10) == train.kip_protocol()
  assert train.paper_protocol('kip', 10).steps == 5000
  # RCIG: Adam 1e-4 in the standard parameterisation (its paper's), 1e-3 in the NTK one.
  assert train.paper_protocol('rcig', 10) == train.rcig_protocol(10, 1e-4)
  assert train.paper_protocol('rcig', 10).steps == 2500
  assert train.paper_protocol('rcig', 10, 'ntk') == train.rcig_protocol(10, 1e-3)
  assert train.paper_protocol('rcig', 40, learning_rate=3e-4) == train.rcig_protocol(40, 3e-4)
  assert (train.paper_protocol('rcig', 10, augmentations='crop_cutout')
          == train.rcig_protocol(10, 1e-4, 'crop_cutout'))
  with pytest.raises(ValueError, match='ntkdd'):
    train.paper_protocol('ntkdd', 10)   # ours is no paper's
  with pytest.raises(ValueError, match='empirical NTK'):
    train.paper_protocol('kip', 10, learning_rate=1e-3)


@pytest.mark.parametrize('preset', sorted(_presets()))
@pytest.mark.parametrize('steps', [1, 2, 3, 7, 20, 250, 10_000])
def test_with_steps_keeps_a_valid_config_with_the_steps_asked_for(preset, steps):
  config = _presets()[preset]
  short = train.with_steps(config, steps)   # a TrainConfig: its checks ran
  assert short.steps == steps
  assert 0 <= short.warmup_steps < steps
  assert short.schedule_steps == 0 or short.warmup_steps < short.schedule_steps <= steps
  assert bool(short.schedule_steps) == bool(config.schedule_steps)
  unchanged = ('steps', 'warmup_steps', 'schedule_steps')
  assert ({k: v for k, v in short.to_dict().items() if k not in unchanged}
          == {k: v for k, v in config.to_dict().items() if k not in unchanged})
  # Fast enough to run: the learning-rate schedule is finite and in [0, 1].
  rates = np.array([train.learning_rate_schedule(short)(i) for i in range(min(steps, 50))])
  assert np.all((rates >= 0) & (rates <= 1))


def test_with_steps_scales_warmup_and_schedule_in_proportion():
  rcig = train.rcig_protocol(10)   # 2500 steps: 500 of warm-up, a schedule of 1000
  tenth = train.with_steps(rcig, 250)
  assert (tenth.warmup_steps, tenth.schedule_steps) == (50, 100)
  assert train.with_steps(rcig, rcig.steps) is rcig
  kip = train.with_steps(train.kip_protocol(), 20)
  assert (kip.steps, kip.warmup_steps, kip.schedule_steps) == (20, 0, 0)
  with pytest.raises(ValueError, match='steps must be > 0'):
    train.with_steps(rcig, 0)


# -- The evaluator under each protocol. --------------------------------------------------------

def test_the_default_protocol_builds_todays_config_and_networks():
  """Without --protocol nothing changes: the same TrainConfig and architectures as before
  protocols existed (the expression below is the one transfer_accuracy used)."""
  support, prepared = _support_and_data()
  for settings, steps, learning_rate, augment_on in [
      (evaluate.TransferSettings(), 1000, 1e-3, False),
      (evaluate.TransferSettings(steps=40, augment=True, parameterization='standard'),
       40, 1e-4, True),
      (evaluate.TransferSettings(steps=8, learning_rate=5e-3), 8, 5e-3, False)]:
    before = dataclasses.replace(
        train.rcig_protocol(len(support.images), learning_rate), steps=steps,
        warmup_steps=min(500, steps // 4), augment=augment_on, schedule_steps=0,
        final_lr_fraction=0.0, warmup_from_zero=False, zero_readout=True, crop_padding=2)
    assert evaluate.transfer_config(settings, len(support.images),
                                    prepared.x_train.shape[1:]) == before
  settings = evaluate.TransferSettings(width=16)
  kernel = architectures.Architecture('fc', depth=1)
  assert evaluate.transfer_architecture('convnet', settings, kernel) == architectures.Architecture(
      'convnet', depth=3, width=16, parameterization='ntk')
  assert evaluate.transfer_architecture('fc', settings, kernel) == architectures.Architecture(
      'fc', depth=1, width=16, parameterization='ntk')
  assert evaluate.transfer_architecture('rcig_convnet', settings) == architectures.Architecture(
      'rcig_convnet', depth=2, width=16, parameterization='ntk')


def test_paper_protocols_train_the_papers_networks():
  kernel = architectures.Architecture('convnet', depth=1, w_std=1.5, b_std=0.2)
  for protocol in PAPER_PROTOCOLS:
    settings = evaluate.TransferSettings(protocol=protocol, width=16)
    # KIP's finite net is the kernel's architecture, at --width, standard parameterisation.
    assert evaluate.transfer_architecture('convnet', settings, kernel) == dataclasses.replace(
        kernel, width=16, parameterization='standard')
    # RCIG's own ConvNet at its paper's depth and LeCun initialisation.
    assert evaluate.transfer_architecture('rcig_convnet', settings) == architectures.Architecture(
        'rcig_convnet', depth=3, w_std=1.0, b_std=0.0, width=16, parameterization='standard')
  ntk = evaluate.TransferSettings(protocol='rcig', parameterization='ntk')
  assert evaluate.transfer_architecture('fc', ntk).parameterization == 'ntk'
  assert evaluate.transfer_config(ntk, 10, (8, 8, 1)).learning_rate == 1e-3
  # RCIG's --augment is its own augmentation (no colour or flips for grayscale) and loop.
  augmented = evaluate.transfer_config(
      evaluate.TransferSettings(protocol='rcig', augment=True), 10, (8, 8, 1))
  assert augmented == train.rcig_protocol(10, 1e-4, augment.default_strategy(1))
  assert augmented.steps == 1000 and not augmented.augment


@pytest.mark.parametrize('protocol, paper_steps', [('kip', 5000), ('rcig', 2500)])
def test_transfer_accuracy_runs_a_shortened_paper_protocol_and_records_it(protocol, paper_steps):
  support, prepared = _support_and_data(images=10)
  kernel = architectures.Architecture('convnet', depth=1)
  settings = evaluate.TransferSettings(networks=('convnet',), width=8, steps=4, seeds=2,
                                       protocol=protocol)
  result = evaluate.transfer_accuracy('convnet', support, prepared, settings, kernel)
  expected = train.with_steps(train.paper_protocol(protocol, 10), 4)
  assert result['protocol'] == protocol and result['paper_steps'] == paper_steps
  assert result['train_config'] == expected.to_dict() and result['steps'] == 4
  assert result['arch'] == dataclasses.replace(kernel, width=8,
                                               parameterization='standard').to_dict()
  assert len(result['accuracies']) == 2 and not any(result['diverged'])
  assert all(0 <= a <= 1 for a in result['accuracies'])
  if protocol == 'kip':   # half the largest stable rate of each net's own empirical NTK
    assert result['train_config']['optimizer'] == 'sgd_momentum'
    assert all(np.isfinite(r) and r > 0 for r in result['learning_rates'])
    assert result['learning_rates'][0] != result['learning_rates'][1]
  else:
    assert result['learning_rates'] == [1e-4, 1e-4]
  json.dumps(result)   # all of it goes into evaluation.json


def test_settings_refuse_what_kips_protocol_cannot_use():
  for bad in (dict(learning_rate=1e-3), dict(augment=True)):
    with pytest.raises(ValueError, match="KIP's protocol"):
      evaluate.TransferSettings(protocol='kip', **bad)
  with pytest.raises(ValueError, match='Unknown protocol'):
    evaluate.TransferSettings(protocol='frepo')


# -- The command line. ---------------------------------------------------------------------------

@pytest.fixture
def support_file(tmp_path):
  """A tiny .npz dataset (3 classes, 8x8) and a support .npz of 6 of its train images."""
  data = make_tiny_npz(tmp_path / 'tiny.npz')
  with np.load(data) as f:
    pixels, ids = f['x_train'][::6].astype(np.float32) / 255, f['y_train'][::6]
  np.savez(tmp_path / 'support.npz', images_pixels=pixels, label_ids=ids)
  return tmp_path


@pytest.mark.parametrize('extra, flag', [(['--train-lr', '0.1'], '--train-lr'),
                                         (['--augment'], '--augment')])
def test_kip_protocol_refuses_the_flags_it_does_not_use(support_file, capsys, extra, flag):
  out = support_file / 'evaluation.json'
  code = cli.main(['evaluate', '--support', str(support_file / 'support.npz'), '--pixels',
                   '--dataset', str(support_file / 'tiny.npz'), '--data-dir', '.',
                   '--protocol', 'kip', '--out', str(out), *extra])
  err = capsys.readouterr().err
  assert code == 2, err
  assert f'{flag} is not used by --protocol kip' in err and f'Drop {flag}' in err, err
  assert 'choose a --protocol that uses it' in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  assert not out.exists()


def test_flags_a_protocol_uses_are_accepted():
  argv = ['evaluate', '--support', 's.npz', '--train-lr', '1e-3', '--augment',
          '--train-steps', '9', '--parameterization', 'ntk']
  for protocol in ('ntkdd', 'rcig'):
    full = argv + ['--protocol', protocol]
    flag_uses.refuse_unused_flags(cli._parser().parse_args(full), cli.given_flags(full))
  kip = ['evaluate', '--support', 's.npz', '--protocol', 'kip', '--train-steps', '9',
         '--parameterization', 'ntk']
  flag_uses.refuse_unused_flags(cli._parser().parse_args(kip), cli.given_flags(kip))


def test_evaluate_command_records_the_protocol(support_file, capsys):
  out = support_file / 'evaluation.json'
  assert cli.main(['evaluate', '--support', str(support_file / 'support.npz'), '--pixels',
                   '--dataset', str(support_file / 'tiny.npz'), '--data-dir', '.',
                   '--protocol', 'rcig', '--train-steps', '3', '--transfer', 'fc',
                   '--width', '8', '--seeds', '1', '--baselines', '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert ('finite networks: --protocol rcig, 3 adam steps per network (shortened by '
          "--train-steps from the paper's 5000), standard parameterisation") in printed
  report = json.loads(out.read_text())
  assert report['protocol'] == 'rcig'
  for name in ('distilled', 'random_real'):
    fc = report[name]['transfer']['fc']
    assert fc['protocol'] == 'rcig' and fc['paper_steps'] == 5000   # 6 images: not 10
    assert fc['train_config'] == train.with_steps(train.rcig_protocol(6), 3).to_dict()


# -- Sets distilled with their mirror images (RCIG's flip_support). ------------------------------

def test_a_mirrored_set_trains_on_both_copies_with_the_schedule_of_the_set_alone(monkeypatch):
  support, prepared = _support_and_data(images=10)
  support = dataclasses.replace(support, mirrored=True)
  seen = {}

  def fake_evaluate_transfer(arch, images, labels, x_test, y_test, config, **kwargs):
    seen.update(images=images, labels=labels, config=config)
    return {'mean': 0.5, 'std': 0.0, 'accuracies': [0.5]}

  monkeypatch.setattr(train, 'evaluate_transfer', fake_evaluate_transfer)
  settings = evaluate.TransferSettings(networks=('rcig_convnet',), width=8, seeds=1,
                                       protocol='rcig')
  result = evaluate.transfer_accuracy('rcig_convnet', support, prepared, settings)
  np.testing.assert_array_equal(seen['images'][:10], support.images)
  np.testing.assert_array_equal(seen['images'][10:], support.images[:, :, ::-1, :])
  np.testing.assert_array_equal(seen['labels'], np.concatenate([support.labels] * 2))
  # RCIG's evaluation counts the distilled images (10: 2500 steps), not the 20 it trains on.
  assert seen['config'] == train.rcig_protocol(10) and result['paper_steps'] == 2500
  assert result['mirror_images'] is True
  unmirrored = evaluate.transfer_accuracy('rcig_convnet', dataclasses.replace(
      support, mirrored=False), prepared, settings)
  assert len(seen['images']) == 10 and unmirrored['mirror_images'] is False


@pytest.mark.parametrize('flag, recorded, expected', [
    ('auto', True, True), ('auto', False, False), ('auto', None, False),
    ('off', True, False), ('on', None, True), ('on', False, True)])
def test_mirror_follows_the_flag_or_what_the_run_recorded(flag, recorded, expected):
  args = types.SimpleNamespace(mirror=flag)
  run_config = None if recorded is None else (
      'run/config.json', {'flags': {'algorithm': 'rcig', 'flip_support': recorded}})
  assert evaluate._mirrored(args, run_config) is expected


def test_evaluate_mirrors_the_distilled_set_only(support_file, capsys):
  out = support_file / 'evaluation.json'
  assert cli.main(['evaluate', '--support', str(support_file / 'support.npz'), '--pixels',
                   '--dataset', str(support_file / 'tiny.npz'), '--data-dir', '.',
                   '--protocol', 'rcig', '--train-steps', '3', '--transfer', 'fc',
                   '--width', '8', '--seeds', '1', '--baselines', '--mirror', 'on',
                   '--no-krr', '--out', str(out)]) == 0
  assert 'the distilled set with its mirror images' in capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report['distilled']['transfer']['fc']['mirror_images'] is True
  assert report['random_real']['transfer']['fc']['mirror_images'] is False
  # Both schedules count the 6 images of the set (5000 steps), not the 12 trained on.
  assert report['distilled']['transfer']['fc']['paper_steps'] == 5000
