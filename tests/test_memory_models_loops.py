"""FFM and the Transformer in both training loops, unchanged: a short run on bsuite catch in the
host loop and on memory_len in the device loop, each stopped, resumed and compared with an
uninterrupted run bit for bit (agent state and the training episodes' scores)."""

import json

import jax
import numpy as np
import pytest

import envs
import envs.jax as jenvs
import worldmodels
from test_memory_models import OVERRIDES
from worldmodels import loop
from worldmodels.config import make_config

COMMON = {"run.train_ratio": 16.0, "run.checkpoint_every": 64, "run.final_eval_episodes": 2}


def config(logdir, name, steps):
    return make_config(["debug"], {**OVERRIDES[name], **COMMON, "run.logdir": str(logdir), "run.steps": steps})


def train_scores(logdir):
    return [(r["env_step"], r["return"]) for r in map(json.loads, (logdir / "scores.jsonl").open())
            if r["mode"] == "train"]


def assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_host_loop_on_catch_resumes_bit_exactly(tmp_path, name):
    make = lambda seed: envs.make("bsuite/catch/0", seed=seed)
    straight = loop.run(config(tmp_path / "a", name, 192), make)
    first = loop.run(config(tmp_path / "b", name, 96), make)
    assert first["env_steps"] == 96
    resumed = loop.run(config(tmp_path / "b", name, 192), make)
    assert resumed["updates"] == straight["updates"] > 0
    assert_same_state(straight["state"], resumed["state"])
    assert train_scores(tmp_path / "a") == train_scores(tmp_path / "b") and len(train_scores(tmp_path / "a")) > 10
    assert type(straight["state"].world_model.dynamics).__name__.lower() == name
    # The resumed run's checkpoint loads and acts on raw observations (worldmodels.load).
    policy = worldmodels.load(tmp_path / "b")
    env = make(7)
    obs, _ = env.reset(seed=7)
    policy.reset()
    for _ in range(12):  # past the end of a 9-step episode
        obs, _, terminated, truncated, _ = env.step(policy.act(obs))
        if terminated or truncated:
            obs, _ = env.reset()
            policy.reset()


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_device_loop_on_memory_len_resumes_bit_exactly(tmp_path, name):
    env, params = jenvs.make("memory_len/0")
    straight = loop.run_on_device(config(tmp_path / "a", name, 256), env, params, chunk_env_steps=64)
    first = loop.run_on_device(config(tmp_path / "b", name, 128), env, params, chunk_env_steps=64)
    assert first["env_steps"] == 128
    resumed = loop.run_on_device(config(tmp_path / "b", name, 256), env, params, chunk_env_steps=64)
    assert resumed["updates"] == straight["updates"] > 0
    assert_same_state(straight["state"], resumed["state"])
    assert_same_state(straight["replay"], resumed["replay"])
    assert train_scores(tmp_path / "a") == train_scores(tmp_path / "b") and len(train_scores(tmp_path / "a")) > 10
