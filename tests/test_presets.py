"""Every named preset resolves to a valid config and an agent of the expected size; CPU presets fit
this project's machine (replay bytes stated up front)."""

import jax
import numpy as np
import pytest

from experiments.presets import CPU_PRESETS, register
from worldmodels import agent as agent_lib
from worldmodels.config import PRESETS, make_config

register()
IMAGE = {"image": ((64, 64, 3), "uint8")}
VECTOR = {"vector": ((8,), "float32")}


def abstract_agent(config, obs_spec):
    """The agent's parameter count without computing anything (shapes only)."""
    state = jax.eval_shape(lambda key: agent_lib.init(config.agent, obs_spec, agent_lib.ActionSpec(6, True), key),
                           jax.random.PRNGKey(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    config = make_config([name])
    assert config.run.batch_size >= 1 and config.run.seq_len >= 1


@pytest.mark.parametrize("size, low, high", [("size1m", 0.4e6, 1.5e6), ("size12m", 8e6, 16e6)])
def test_model_size_presets_have_about_their_size(size, low, high):
    assert low <= abstract_agent(make_config([size]), VECTOR) <= high


@pytest.mark.parametrize("name", sorted(CPU_PRESETS))
def test_cpu_presets_build_a_small_agent_and_a_replay_that_fits(name):
    config = make_config([name])
    images = "maze" in name or "vision" in name
    params = abstract_agent(config, IMAGE if images else VECTOR)
    assert params < 5e6, params  # trainable on 2 CPU cores
    step_bytes = (64 * 64 * 3 if images else 8 * 4) + 6 * 4 + 4 + 3
    assert config.run.replay_capacity * step_bytes < 4 * 2**30  # a 24 GiB machine keeps room to train


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("r2i")))
def test_r2i_presets_use_the_2023_continue_scheme_and_dreamer_presets_the_2024_one(name):
    r2i = make_config([name]).agent.actor_critic
    assert not r2i.contdisc and not r2i.repval_grad
    dreamer = make_config(["size1m", "dreamer-bsuite-cpu"]).agent.actor_critic
    assert dreamer.contdisc and dreamer.repval_grad
