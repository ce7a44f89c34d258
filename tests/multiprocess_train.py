"""`python -m experiments.train ARGS` as one process of a multi-process run, then this process's copy of
the trained parameters into `<logdir>/params.process<k>.npz` (for tests/test_multiprocess.py)."""

import sys

import equinox as eqx
import jax
import numpy as np

from experiments import train
from worldmodels import loop, sharding

run = loop.run


def run_and_save(config, *args, **kwargs):
    summary = run(config, *args, **kwargs)
    params = sharding.local_copy(eqx.filter(summary["state"].params, eqx.is_array))
    np.savez(f"{config.run.logdir}/params.process{jax.process_index()}.npz", *jax.device_get(jax.tree.leaves(params)))
    return summary


loop.run = run_and_save
train.main(sys.argv[1:])
