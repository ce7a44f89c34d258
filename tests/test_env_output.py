"""Env output checked at the boundary: NaN/inf or wrongly shaped observations and rewards never reach
replay. The host loop stops with an error naming the env, the key and the step; env processes
(`--run.parallel-envs`) restart such an env and drop its episode, as for a crash."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest

from crashing_envs import NaNEnv
from envs.parallel import EnvCrashWarning, ParallelVectorEnv
from worldmodels import loop, spaces
from worldmodels.config import make_config


@pytest.mark.parametrize("where, cause", [("reward", "non-finite reward"), ("obs", "non-finite values for 'observation'"),
                                          ("shape", r"shape \(2,\) for 'observation'")])
def test_env_process_with_bad_output_is_restarted(where, cause):
    envs = ParallelVectorEnv([functools.partial(NaNEnv, at=100), functools.partial(NaNEnv, at=3, where=where)])
    try:
        envs.reset(seed=0)
        for _ in range(2):
            assert not envs.step(np.array([0, 1]))[4]["restarted"].any()
        with pytest.warns(EnvCrashWarning, match=f"env 1 crashed: .*{cause}"):
            obs, reward, _, _, info = envs.step(np.array([0, 1]))
        np.testing.assert_array_equal(info["restarted"], [False, True])
        assert np.isfinite(obs).all() and np.isfinite(reward).all() and obs[1, 0] == 0  # a new first step
    finally:
        envs.close()


def test_output_problem_names_the_env_and_the_key():
    box = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    good = np.zeros((2, 3), np.float32)
    assert spaces.output_problem(box, good, np.zeros(2), 2) is None
    bad = good.copy()
    bad[1, 2] = np.nan
    assert spaces.output_problem(box, bad, np.zeros(2), 2) == (1, "observation", "non-finite values (nan)")
    assert spaces.output_problem(box, good, np.array([0.0, np.inf]), 2) == (1, "reward", "a non-finite reward (inf)")
    assert spaces.output_problem(box, good[:, :2], np.zeros(2), 2)[2] == "shape (2,) instead of the space's (3,)"
    image = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)})
    assert spaces.output_problem(image, {"image": np.zeros((2, 8, 8, 3), np.uint8)}, np.zeros(2), 2) is None


def _config(tmp_path, **run):
    return make_config(["debug"], {"run.logdir": str(tmp_path), "run.steps": 128, "run.env": "test:nan",
                                   **{f"run.{k}": v for k, v in run.items()}})


def test_host_loop_stops_on_a_nan_reward_naming_env_key_and_step(tmp_path):
    with pytest.raises(loop.EnvOutputError, match=r"env 'test:nan' \(env 0 of 1\) returned a non-finite reward "
                                                  r"\(nan\) for 'reward' at env step 5"):
        loop.run(_config(tmp_path), lambda seed: NaNEnv(at=5))


def test_loop_with_env_processes_drops_the_bad_episode_and_goes_on(tmp_path):
    # every 5th step is bad: 24 steps, 4 restarts (each spawns a fresh process, a few seconds)
    with pytest.warns(EnvCrashWarning, match="non-finite reward") as crashes:
        summary = loop.run(_config(tmp_path, steps=24, parallel_envs=True, train_ratio=0.0, final_eval_episodes=0),
                           lambda seed: NaNEnv(at=5), parallel_vector_env=ParallelVectorEnv)
    assert summary["env_steps"] == 24
    assert sum(issubclass(w.category, EnvCrashWarning) for w in crashes) == 4
