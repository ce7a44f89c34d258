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


# R2I's configs.yaml (configs_backup.yaml for BSuite), transcribed by hand: deter, H, P, SSM layers,
# encoder/decoder MLP (layers, units), reward/continue heads (layers, units), CNN depth, actor and
# critic (layers, units), learning rates (world model, actor and critic), loss scales (dyn, rep).
R2I_RELEASED = {
    "r2i": (4096, 1024, 128, 4, (5, 1024), (5, 1024), 96, (5, 1024), (1e-4, 3e-5), (0.5, 0.1)),
    "r2i-memory-maze": (2048, 1024, 512, 5, (4, 400), (4, 1024), 48, (4, 1024), (3e-4, 1e-4), (0.8, 0.2)),
    "r2i-popgym": (1024, 512, 128, 3, (1, 512), (2, 512), 32, (2, 512), (1e-4, 3e-5), (0.5, 0.1)),
    "r2i-bsuite": (512, 512, 128, 3, (5, 1024), (2, 512), 32, (2, 512), (1e-4, 3e-5), (0.5, 0.1)),
    "r2i-dmc": (512, 512, 128, 4, (5, 1024), (2, 512), 32, (2, 512), (1e-4, 3e-5), (0.5, 0.1)),
}


@pytest.mark.parametrize("name", sorted(R2I_RELEASED))
def test_r2i_released_presets_match_r2is_configs(name):
    deter, width, state, layers, mlp, heads, cnn, ac, (lr, ac_lr), (dyn, rep) = R2I_RELEASED[name]
    agent = make_config([name]).agent
    wm, s3m, opt = agent.world_model, agent.world_model.sequence.s3m, agent.optim
    assert (s3m.deter, s3m.width, s3m.state_size, s3m.layers) == (deter, width, state, layers)
    assert (s3m.stoch, s3m.classes, s3m.hippo_blocks, s3m.hidden, s3m.img_layers, s3m.obs_layers) == (
        32, 32, 8, width, 1, 1)
    assert ((wm.layers, wm.units), (wm.head_layers, wm.head_units), wm.cnn_depth) == (mlp, heads, cnn)
    assert (agent.actor_critic.layers, agent.actor_critic.units) == ac
    assert (opt.lr, opt.actor_lr, opt.critic_lr, opt.warmup) == (lr, ac_lr, ac_lr, 0)
    assert (wm.dyn_scale, wm.rep_scale) == (dyn, rep)
    assert opt.weight_decay == (1e-2 if name == "r2i-memory-maze" else 0.0)
    assert {wm.norm, s3m.norm, agent.actor_critic.norm} == {"layer"}
    assert abstract_agent(make_config([name]), IMAGE if "maze" in name else VECTOR) > 1e6  # it builds


def test_the_four_memory_presets_have_parameter_counts_within_10_percent():
    """The bsuite CPU presets of RSSM, S3M, FFM and Transformer, for memory_len's spaces."""
    names = ("dreamer-bsuite-cpu", "r2i-bsuite-cpu", "ffm-bsuite-cpu", "transformer-bsuite-cpu")
    counts = {}
    for name in names:
        config = make_config([name])
        state = jax.eval_shape(lambda key: agent_lib.init(config.agent, {"vector": ((3,), "float32")},
                                                          agent_lib.ActionSpec(2, True), key), jax.random.PRNGKey(0))
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        assert config.agent.world_model.sequence.model == {"dreamer": "rssm", "r2i": "s3m"}.get(
            name.split("-")[0], name.split("-")[0])
    for a in names:
        for b in names:
            assert abs(counts[a] - counts[b]) <= 0.1 * counts[b], counts
