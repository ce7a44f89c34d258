"""Offline world models: --run.save-episodes records episodes, experiments.train_world_model trains on
them alone, and --agent.init-world-model starts an agent from the result."""

from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import jax
import numpy as np
import pytest

import envs
from experiments import train_world_model
from worldmodels import loop, offline
from worldmodels.config import ConfigError, make_config
from worldmodels.logging import read_jsonl


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("record")
    config = make_config(["debug"], {"run.env": "gym:CartPole-v1", "run.logdir": str(logdir), "run.steps": 400,
                                     "run.train_start": 300, "run.save_episodes": True, "run.final_eval_episodes": 0})
    loop.run(config, lambda seed: envs.make(config.run.env, seed=seed))
    return logdir


def test_save_episodes_writes_each_finished_episode(recorded):
    files = sorted((recorded / "episodes").glob("*.npz"))
    scores = [r for r in read_jsonl(recorded / "scores.jsonl") if r["mode"] == "train"]
    assert len(files) == len(scores) > 5
    for f, score in zip(files, scores):
        with np.load(f) as e:
            assert set(e.files) == {"vector", "action", "reward", "is_first", "is_last", "is_terminal"}
            n = score["length"] + 1  # the first observation, then one stored step per env step
            assert e["vector"].shape == (n, 4) and e["action"].shape == (n, 2)
            assert e["is_first"][0] and not e["is_first"][1:].any() and e["is_last"][-1] and not e["is_last"][:-1].any()
            assert e["reward"].sum() == score["return"] and not e["action"][0].any()
            assert (e["action"][1:].sum(-1) == 1).all()  # one-hot actions into each later step
    episodes, obs_space, act_space = offline.load_episodes(recorded / "episodes")
    assert len(episodes) == len(files) and obs_space.shape == (4,) and act_space.n == 2


def test_train_world_model_then_start_an_agent_from_it(recorded, tmp_path):
    wm_dir = tmp_path / "wm"
    result = train_world_model.main(["--data", str(recorded / "episodes"), "--updates", "120", "--eval-every", "60",
                                     "--preset", "debug", "--agent.optim.lr", "1e-3", "--run.logdir", str(wm_dir)])
    before, after = result["before"], result["after"]
    for term in ("rec_vector", "reward", "cont"):
        assert after[f"heldout/{term}"] < before[f"heldout/{term}"], (term, before, after)
    assert after["heldout/open_loop_vector/h1"] < before["heldout/open_loop_vector/h1"]
    assert [r["env_step"] for r in read_jsonl(wm_dir / "metrics.jsonl")] == [0, 60, 120]

    config = make_config(["debug"], {"run.env": "gym:CartPole-v1", "run.logdir": str(tmp_path / "agent"),
                                     "run.steps": 64, "run.train_start": 10_000, "run.final_eval_episodes": 0,
                                     "agent.init_world_model": str(wm_dir)})
    summary = loop.run(config, lambda seed: envs.make(config.run.env, seed=seed))
    episodes, obs_space, act_space = offline.load_episodes(recorded / "episodes")
    saved = offline.load_world_model(wm_dir, config, obs_space, act_space)
    fresh = offline.init(config, obs_space, act_space, jax.random.PRNGKey(0)).world_model
    leaves = lambda t: jax.tree.leaves(t)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(summary["state"].world_model), leaves(saved)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(saved), leaves(fresh)))  # it was trained

    other = dataclasses.replace(config, agent=dataclasses.replace(
        config.agent, world_model=dataclasses.replace(config.agent.world_model, units=48)))
    with pytest.raises(ConfigError, match="units: 32 there, 48 here"):
        offline.load_world_model(wm_dir, other, obs_space, act_space)


def test_train_world_model_errors(tmp_path):
    with pytest.raises(SystemExit, match="no spaces.json"):
        train_world_model.main(["--data", str(tmp_path), "--preset", "debug", "--run.logdir", str(tmp_path / "x")])
    (tmp_path / "spaces.json").write_text(json.dumps({"observation": {"kind": "Discrete", "n": 2, "start": 0},
                                                      "action": {"kind": "Discrete", "n": 2, "start": 0}}))
    with pytest.raises(SystemExit, match="no episodes"):
        train_world_model.main(["--data", str(tmp_path), "--preset", "debug", "--run.logdir", str(tmp_path / "x")])


def test_open_loop_error_counts_a_window_only_within_one_episode():
    obs_space, act_space = gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2)
    config = make_config(["debug"])
    wm = offline.init(config, obs_space, act_space, jax.random.PRNGKey(0)).world_model
    b, t = 2, 12
    batch = {"vector": np.random.default_rng(0).normal(size=(b, t, 3)).astype(np.float32),
             "action": np.zeros((b, t, 2), np.float32), "reward": np.zeros((b, t), np.float32),
             "is_first": np.zeros((b, t), bool), "is_last": np.zeros((b, t), bool),
             "is_terminal": np.zeros((b, t), bool)}
    batch["is_first"][:, 0] = True
    batch["is_first"][0, 8] = True  # window 0 starts an episode at step 8: 3 steps ahead (5, 6, 7) count
    key = jax.random.PRNGKey(1)
    _, errors = offline.held_out(wm, batch, key, 5, config)
    # by hand: each window's squared error in symlog units, averaged where its episode has not changed
    pred = np.asarray(wm.open_loop(batch, wm.dynamics.initial(b), 5, key)["vector"])
    truth = np.sign(batch["vector"]) * np.log1p(np.abs(batch["vector"]))
    err = ((pred - truth) ** 2).mean(-1)[:, 5:]
    expected = np.concatenate([err[:, :3].mean(0), err[1, 3:]])  # window 0 counts for 3 steps ahead only
    np.testing.assert_allclose(np.asarray(errors["vector"]), expected, rtol=1e-4)
    batch["is_first"][1, 6] = True  # window 1 now counts 1 step ahead only: none reaches 4 steps ahead
    _, errors = offline.held_out(wm, batch, key, 5, config)
    np.testing.assert_allclose(np.asarray(errors["vector"])[:3], [err[:, 0].mean(), err[0, 1], err[0, 2]], rtol=1e-4)
    assert np.isnan(np.asarray(errors["vector"])[3:]).all()
