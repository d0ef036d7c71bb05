"""Installs ntkdd: the four code folders land under the single `ntkdd.*` namespace."""
from setuptools import setup

PACKAGES = {
    'ntkdd': 'ntkdd',
    'ntkdd.common': 'common',
    'ntkdd.server': 'server',
    'ntkdd.workers': 'workers',
    'ntkdd.launch': 'launch',
}

setup(
    name='ntkdd',
    version='0.1.0',
    description='Dataset distillation with neural tangent kernels (KIP, LS, RCIG), '
                'distributed over a pool of kernel workers.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=['jax', 'numpy', 'absl-py'],
    extras_require={
        # Training finite-width networks (evaluate, RCIG) and the optimisers of KIP.
        'train': ['optax'],
        # Pictures: support-image grids and curves (PNG), reading folders of JPEG/PNG images.
        'images': ['pillow', 'matplotlib'],
        # The reference kernels; the pinned stack lives in constraints/launchpad.txt.
        'nt': ['neural-tangents'],
        # Launchpad + Courier (Python 3.10 only, with TensorFlow 2.8; see constraints/launchpad.txt).
        'launchpad': ['dm-launchpad==0.5.2', 'tensorflow-cpu==2.8.4'],
        # The Ray launch type (--launch ray), on the driver and every node of the cluster.
        'ray': ['ray>=2.9'],
        # Progress bars on a terminal (without it: plain log lines).
        'progress': ['tqdm'],
        # --tensorboard: event files for `tensorboard --logdir runs/` (no TensorFlow needed).
        'tensorboard': ['tensorboardX'],
        # Reading support sets from the RCIG and FRePo code's flax checkpoints (evaluate).
        'foreign': ['msgpack'],
        'dev': ['pytest', 'optax', 'pillow', 'matplotlib', 'ray>=2.9', 'tqdm', 'tensorboardX',
                'msgpack'],
    },
    entry_points={'console_scripts': ['ntkdd = ntkdd.launch.cli:main']},
)
