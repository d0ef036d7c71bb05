"""--pin-workers: a worker process pins all its threads to its own core before computing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ntkdd.launch import cli, launch_types
from ntkdd.workers import cpu_pinning

pytestmark = pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='Linux only')


def test_core_for_deals_the_allowed_cores_in_order():
  assert [cpu_pinning.core_for(i, {5, 2, 9}) for i in range(5)] == [2, 5, 9, 2, 5]
  with pytest.raises(ValueError, match='No CPU core'):
    cpu_pinning.core_for(0, set())


_CHILD = r'''
import json, os, sys, threading, time
from ntkdd.workers import kernel_worker, protocol
index = int(sys.argv[1])
stop = threading.Event()
early = threading.Thread(target=stop.wait)     # a thread that exists before pinning
early.start()
worker = kernel_worker.KernelWorker({'name': 'fc', 'depth': 1},
                                    worker_id=index, pin_core=True)
import numpy as np
x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
answer = protocol.decode(worker.kernel_block(protocol.encode({'rows': x, 'cols': x})))
late = threading.Thread(target=stop.wait)      # one started after pinning
late.start()
masks = {tid: sorted(os.sched_getaffinity(tid)) for tid in
         map(int, os.listdir('/proc/self/task'))}
stop.set()
print(json.dumps({'core': protocol.decode(worker.ping())['core'], 'ok': answer['ok'],
                  'masks': list(masks.values())}))
'''


@pytest.mark.parametrize('index', [0, 1])
def test_a_pinned_worker_runs_every_thread_on_its_core(index):
  allowed = sorted(os.sched_getaffinity(0))
  out = subprocess.run([sys.executable, '-c', _CHILD, str(index)], capture_output=True,
                       text=True, timeout=300, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  core = allowed[index % len(allowed)]
  assert result['ok'] and result['core'] == core
  # JAX's runtime threads, the thread started before pinning and the one after: all on it.
  assert len(result['masks']) >= 3
  assert all(mask == [core] for mask in result['masks']), result['masks']


def test_unpinned_workers_report_no_core():
  from ntkdd.workers import kernel_worker, protocol
  worker = kernel_worker.KernelWorker({'name': 'fc', 'depth': 1})
  assert protocol.decode(worker.ping())['core'] is None


@pytest.mark.parametrize('launch', ['launchpad', 'ray'])
def test_the_flag_reaches_the_workers_arguments(launch):
  args = cli._parser().parse_args(['distill', '--out', 'x', '--launch', launch, '--workers', '2',
                                   '--pin-workers'])
  assert launch_types.worker_kwargs(args) == {'pin_core': True}
  args = cli._parser().parse_args(['distill', '--out', 'x', '--launch', launch, '--workers', '2'])
  assert launch_types.worker_kwargs(args) == {}
