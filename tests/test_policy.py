"""worldmodels.load: a trained run acts on raw gymnasium observations as the training loop's policy
does, and opening a run dir (load, evaluate, resume) runs no code from it."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import gymnasium as gym
import jax
import numpy as np
import pytest

import envs
import worldmodels
from experiments import evaluate
from worldmodels import agent as agent_lib
from worldmodels import loop, spaces
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import make_config


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("cartpole")
    config = make_config(["debug"], {"run.env": "gym:CartPole-v1", "run.logdir": str(logdir), "run.steps": 160,
                                     "run.train_start": 64, "run.final_eval_episodes": 0})
    summary = loop.run(config, lambda seed: envs.make(config.run.env, seed=seed))
    return logdir, config, summary["state"]


def _loop_actions(state, observations, firsts, keys, greedy):
    """What the training loop does to act (loop.HostRun.collect), on `[N, ...]` observation batches:
    its conversions and policy step. **Returns:** one `[N]` array of CartPole actions per step."""
    space, act_space = gym.make("CartPole-v1").observation_space, gym.make("CartPole-v1").action_space
    n = len(firsts[0])
    carry, out = agent_lib.initial_carry(state, n), []
    for obs, first, key in zip(observations, firsts, keys):
        batch = {**spaces.batch_obs(space, obs, n), "is_first": np.asarray(first)}
        action, carry = agent_lib.policy(state, carry, batch, key, greedy)
        out.append(spaces.env_actions(act_space, np.asarray(action)).tolist())
    return out


def _episode_observations(seed: int, steps: int):
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    observations, firsts = [obs], [True]
    rng = np.random.default_rng(seed)
    for _ in range(steps - 1):
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
        first = terminated or truncated
        if first:
            obs, _ = env.reset()
        observations.append(obs)
        firsts.append(first)
    return observations, firsts


def test_load_restores_the_trained_state_and_acts_as_the_loop(cartpole_run):
    logdir, config, trained = cartpole_run
    policy = worldmodels.load(logdir)
    assert policy.step == 160 and policy.config == config
    assert policy.world_model is policy.agent_state.world_model
    pairs = list(zip(jax.tree.leaves(trained), jax.tree.leaves(policy.agent_state)))
    assert pairs and all(np.array_equal(a, b) for a, b in pairs)
    assert policy.observation_space == gym.make("CartPole-v1").observation_space

    observations, firsts = _episode_observations(seed=3, steps=40)
    assert any(firsts[1:])  # an episode boundary inside: the carry must reset there
    keys = list(jax.random.split(jax.random.PRNGKey(11), len(observations)))
    for greedy in (True, False):
        expected = [a[0] for a in _loop_actions(trained, [o[None] for o in observations], [[f] for f in firsts],
                                                keys, greedy)]
        policy.reset()
        got = [policy.act(obs, greedy=greedy, first=first, key=k) for obs, first, k in zip(observations, firsts, keys)]
        assert all(np.ndim(a) == 0 and a in (0, 1) for a in got)  # what CartPole's step takes
        assert [int(a) for a in got] == [int(a) for a in expected]
    policy.reset()
    policy.act(observations[0])
    assert policy.features.shape == (1, policy.world_model.dynamics.policy_feature_dim)
    # sampled actions differ from greedy ones somewhere (the comparison above can fail)
    batches, flags = [o[None] for o in observations], [[f] for f in firsts]
    assert _loop_actions(trained, batches, flags, keys, True) != _loop_actions(trained, batches, flags, keys, False)


def test_policy_on_a_vector_env_batch(cartpole_run):
    """A vector env's batch, with its autoresets marked by `first`, acts as the loop does on it."""
    logdir, _, trained = cartpole_run
    policy = worldmodels.load(logdir)
    vec = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2,
                                   autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    obs, _ = vec.reset(seed=[5, 6])
    policy.reset(batch_size=2)
    keys = list(jax.random.split(jax.random.PRNGKey(2), 60))
    observations, firsts, actions = [], [], []
    first, ended = np.ones(2, bool), np.zeros(2, bool)
    for k in keys:
        observations.append(obs)
        firsts.append(first)
        action = policy.act(obs, greedy=False, first=first, key=k)
        assert action.shape == (2,)
        actions.append(action.tolist())
        obs, _, terminated, truncated, _ = vec.step(action)
        first = ended  # NEXT_STEP autoreset: the step after an episode's last returns the reset observation
        ended = (terminated | truncated) & ~first
    assert np.any(firsts[1:])
    assert actions == _loop_actions(trained, observations, firsts, keys, greedy=False)
    with pytest.raises(ValueError, match="reset\\(batch_size=2\\)"):
        policy.act(observations[0][0])


def test_load_errors_name_the_fix(tmp_path, cartpole_run):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        worldmodels.load(tmp_path)
    logdir, _, _ = cartpole_run
    (tmp_path / "config.json").write_text((logdir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="observation_space="):
        worldmodels.load(tmp_path)
    space = gym.make("CartPole-v1")
    with pytest.raises(FileNotFoundError, match="no checkpoints/"):
        worldmodels.load(tmp_path, observation_space=space.observation_space, action_space=space.action_space)


def _plant(marker: str, env_state: dict) -> dict:
    """Unpickling this leaves a file behind: proof that code from a run dir ran."""
    Path(marker).touch()
    return env_state


class _Planted:
    def __init__(self, marker: str, env_state: dict):
        self.marker, self.env_state = marker, env_state

    def __reduce__(self):
        return _plant, (self.marker, self.env_state)


def test_opening_a_run_dir_unpickles_nothing_it_holds(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    logdir = tmp_path / "run"
    config = make_config(["debug"], {"run.env": "gym:CartPole-v1", "run.logdir": str(logdir), "run.steps": 96,
                                     "run.train_start": 64, "run.final_eval_episodes": 0})
    env_state = loop._env_state
    # the run's env pickle becomes one that, unpickled, runs code
    monkeypatch.setattr(loop, "_env_state", lambda vec: _Planted(str(marker), env_state(vec)))
    loop.run(config, lambda seed: envs.make(config.run.env, seed=seed))
    monkeypatch.undo()
    assert not marker.exists()
    with Checkpointer(logdir / "checkpoints") as ckpt:  # signed with this user's key, a hex HMAC-SHA256
        assert len(ckpt.read_meta(96)["envs_signature"]) == 64
    # (that a run signed by this user's key restores its envs by default: test_loop's exact resume)
    shutil.copytree(logdir, tmp_path / "copy")

    # someone else's run: their key signed it, not ours
    monkeypatch.setenv("WORLDMODELS_SIGNING_KEY", str(tmp_path / "another_users_key"))
    worldmodels.load(logdir).act(np.zeros(4, np.float32))
    evaluate.main([str(logdir), "--episodes", "1"])
    more = lambda **kw: dataclasses.replace(config, run=dataclasses.replace(config.run, **kw))
    with pytest.warns(UserWarning, match="not signed with this user's key.*--run.trust-env-pickle"):
        summary = loop.run(more(steps=128), lambda seed: envs.make(config.run.env, seed=seed))
    assert summary["env_steps"] == 128 and not marker.exists()

    # the user's own run: asked for with the flag, the pickle is read (so the checks above could fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # and no "not signed" warning
        loop.run(more(steps=128, trust_env_pickle=True, logdir=str(tmp_path / "copy")),
                 lambda seed: envs.make(config.run.env, seed=seed))
    assert marker.exists()
