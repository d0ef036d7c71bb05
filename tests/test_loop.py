"""The run skeleton (server/loop.py) with a toy algorithm: cadences, resume, NaN advice, cleanup."""
import dataclasses
import json

import numpy as np
import pytest

from ntkdd.server import checkpoint, distill, loop


class Counter:
  """A toy algorithm: each step draws a number from the run's generator and adds it up."""
  name = 'COUNT'
  accuracy_key = 'test_accuracy'
  learning_rate = 0.5

  def __init__(self, prepared, blow_up_at=None):
    self.prepared, self.blow_up_at = prepared, blow_up_at

  def start(self, rng):
    self.images = self.prepared.x_train[:2].astype(np.float32)
    self.labels = np.zeros((2, self.prepared.num_classes), np.float32)
    self.label_ids = self.prepared.y_train[:2]
    self.total = np.zeros((), np.int64)

  def restore(self, arrays, rng):
    self.images, self.labels = arrays['images'], arrays['labels']
    self.label_ids, self.total = arrays['label_ids'], arrays['total']

  def step(self, step, rng):
    if step + 1 == self.blow_up_at:
      raise FloatingPointError('blown up')
    draw = int(rng.integers(1000))
    self.total = self.total + draw
    self.images = self.images + 1
    return {'loss': float(draw)}

  def rates(self):
    return {'rate': 1.0}

  def evaluate(self, step):
    return {'test_accuracy': (step % 3) / 3}

  def arrays(self):
    return {'images': self.images, 'labels': self.labels, 'label_ids': self.label_ids,
            'total': self.total}

  def support(self, step):
    return self.images, self.labels

  def support_scalars(self):
    return {}

  def summary(self, end):
    return dict(dataclasses.asdict(end), total=int(self.total))


@pytest.fixture
def prepared(tiny_npz):
  return distill.prepare_data(distill.DistillConfig(dataset=tiny_npz, data_dir='.'))


def _run(prepared, run_dir, steps, algorithm=None, resume=False, **kw):
  run_dir.mkdir(exist_ok=True)
  saved = checkpoint.load_checkpoint(run_dir) if resume else None
  settings = dict(dict(seed=4, eval_every=2, checkpoint_every=2, progress=False), **kw)
  return loop.run_steps(algorithm or Counter(prepared), saved, run_dir, prepared, steps=steps,
                        **settings)


def _metrics(run_dir):
  return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_cadences_and_summary(prepared, tmp_path):
  summary = _run(prepared, tmp_path / 'run', 5)
  rows = _metrics(tmp_path / 'run')
  assert [r['step'] for r in rows] == [0, 1, 2, 3, 4, 5]
  assert [r['step'] for r in rows if 'test_accuracy' in r] == [0, 2, 4, 5]   # and at the end
  assert all(r['rate'] == 1.0 for r in rows[1:])
  assert summary['step'] == 5 and summary['fresh'] and summary['before'] == 0.0
  assert summary['accuracy'] == 2 / 3 and summary['best'] == {'accuracy': 2 / 3, 'step': 2}
  arrays, meta = checkpoint.load_checkpoint(tmp_path / 'run')
  assert meta['step'] == 5 and int(arrays['total']) == summary['total']
  expected = prepared.x_train[:2].astype(np.float32)
  for _ in range(5):
    expected = expected + 1
  with np.load(tmp_path / 'run' / 'support.npz') as f:   # the support as of the last step
    np.testing.assert_array_equal(f['images'], expected)
  assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['total'] == summary['total']


def test_a_resumed_run_draws_and_logs_as_one_straight_run(prepared, tmp_path):
  straight = _run(prepared, tmp_path / 'straight', 6)
  _run(prepared, tmp_path / 'parts', 3, checkpoint_every=3)
  resumed = _run(prepared, tmp_path / 'parts', 6, resume=True)
  assert resumed['total'] == straight['total'] and not resumed['fresh']
  assert resumed['best'] == straight['best'] and resumed['before'] == straight['before']
  losses = lambda d: [(r['step'], r['loss']) for r in _metrics(tmp_path / d)]
  assert losses('parts') == losses('straight')


def test_a_blown_up_step_names_the_last_good_checkpoint(prepared, tmp_path):
  with pytest.raises(FloatingPointError, match=r'Step 4: .*last good checkpoint \(step 2\).*'
                                               r'smaller --lr \(e\.g\. 0\.05\)'):
    _run(prepared, tmp_path / 'run', 6, algorithm=Counter(prepared, blow_up_at=4))
  assert checkpoint.load_checkpoint(tmp_path / 'run')[1]['step'] == 2


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_nothing(prepared, tmp_path):
  def body(saved, board):
    assert saved is None and board is None
    assert (tmp_path / 'run' / 'config.json').exists()
    raise RuntimeError('failed at the start')

  with pytest.raises(RuntimeError, match='failed at the start'):
    loop.run_in_dir(tmp_path / 'run', {'steps': 1}, (), prepared, body, resume=False,
                    overwrite=False, arrays_needed=(), total_steps=1)
  assert not (tmp_path / 'run').exists()
