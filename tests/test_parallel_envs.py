"""ParallelVectorEnv: same results as SyncVectorEnv; crashed or hung env processes are restarted;
the training loop runs through a crash and drops the crashed episode."""

from __future__ import annotations

import functools
import json

import gymnasium as gym
import numpy as np
import pytest

from crashing_envs import make_env
from envs.parallel import EnvCrashWarning, ParallelVectorEnv
from worldmodels import loop
from worldmodels.config import make_config

NUM_ENVS = 3


def reference(seed: int, actions: np.ndarray) -> list[tuple]:
    """SyncVectorEnv (NEXT_STEP autoreset) results of `actions` [T, num_envs] after reset(seed)."""
    envs = gym.vector.SyncVectorEnv([functools.partial(make_env) for _ in range(NUM_ENVS)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    out = [envs.reset(seed=seed)[0]]
    out += [envs.step(a)[:4] for a in actions]
    envs.close()
    return out


def actions(steps: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 3, (steps, NUM_ENVS))


def test_matches_sync_vector_env():
    acts = actions(40)
    expected = reference(5, acts)
    envs = ParallelVectorEnv([functools.partial(make_env) for _ in range(NUM_ENVS)])
    try:
        obs, _ = envs.reset(seed=5)
        np.testing.assert_array_equal(obs, expected[0])
        ends = 0
        for a, (e_obs, e_rew, e_term, e_trunc) in zip(acts, expected[1:]):
            obs, rew, term, trunc, info = envs.step(a)
            np.testing.assert_array_equal(obs, e_obs)
            np.testing.assert_array_equal(rew, e_rew)
            np.testing.assert_array_equal(term, e_term)
            np.testing.assert_array_equal(trunc, e_trunc)
            assert not info["restarted"].any()
            ends += int(term.sum() + trunc.sum())
        assert ends >= 5  # autoresets were exercised (both kinds of end occur with these seeds)
        assert envs.call("max_steps") == (12,) * NUM_ENVS
    finally:
        envs.close()


@pytest.mark.parametrize("how, cause", [("raise", "RuntimeError: injected crash .* in step"),
                                        ("exit", "exited with code 3"),
                                        ("segfault", "killed by SIGSEGV")])
def test_crashed_env_is_restarted_and_the_others_are_unaffected(tmp_path, how, cause):
    crash_at = 6
    acts = actions(20)
    expected = reference(5, acts)
    crash = {"at_step": crash_at, "how": how, "marker": str(tmp_path / "crashed")}
    fns = [functools.partial(make_env, crash=crash if i == 1 else None) for i in range(NUM_ENVS)]
    envs = ParallelVectorEnv(fns)
    try:
        envs.reset(seed=5)
        env1_steps = 0  # env.step calls of env 1 (autoreset steps call reset instead)
        for t, (a, (e_obs, e_rew, e_term, e_trunc)) in enumerate(zip(acts, expected[1:])):
            autoreset = t > 0 and (expected[t][2][1] or expected[t][3][1])
            crashing = not autoreset and env1_steps + 1 == crash_at
            if crashing:
                with pytest.warns(EnvCrashWarning, match=f"env 1 crashed: .*{cause}"):
                    obs, rew, term, trunc, info = envs.step(a)
                np.testing.assert_array_equal(info["restarted"], [False, True, False])
                assert obs[1, 0] == 0 and obs[1, 2] == -1  # the new env's first observation
                assert rew[1] == 0 and not term[1] and not trunc[1]
                break
            obs, rew, term, trunc, info = envs.step(a)
            env1_steps += not autoreset
            np.testing.assert_array_equal(obs, e_obs)  # env 1 too, until it crashes
            np.testing.assert_array_equal(rew, e_rew)
            assert not info["restarted"].any()
        else:
            pytest.fail("the crash step was not reached")
        env1_t = []
        for a, (e_obs, e_rew, e_term, e_trunc) in zip(acts[t + 1:], expected[t + 2:]):
            obs, rew, term, trunc, info = envs.step(a)
            env1_t.append(obs[1, 0])
            keep = [0, 2]
            np.testing.assert_array_equal(obs[keep], e_obs[keep])
            np.testing.assert_array_equal(rew[keep], e_rew[keep])
            np.testing.assert_array_equal(term[keep], e_term[keep])
            np.testing.assert_array_equal(trunc[keep], e_trunc[keep])
            assert not info["restarted"].any()
        assert env1_t[:3] == [1, 2, 3]  # the rebuilt env 1 steps on (its time limit is 12)
        np.testing.assert_array_equal(envs.restart_counts, [0, 1, 0])
        assert [i for i, _ in envs.failures] == [1]
    finally:
        envs.close()


def test_hung_env_is_restarted_after_the_step_timeout(tmp_path):
    crash = {"at_step": 2, "how": "hang", "marker": str(tmp_path / "hung")}
    envs = ParallelVectorEnv([functools.partial(make_env, end_prob=0.0, crash=crash if i == 0 else None)
                              for i in range(2)],
                             step_timeout=2.0)
    try:
        envs.reset(seed=0)
        envs.step(np.array([0, 0]))
        with pytest.warns(EnvCrashWarning, match="env 0 crashed: no answer to step within the timeout"):
            _, _, _, _, info = envs.step(np.array([0, 0]))
        np.testing.assert_array_equal(info["restarted"], [True, False])
        _, _, _, _, info = envs.step(np.array([0, 0]))
        assert not info["restarted"].any()
    finally:
        envs.close()


def test_env_that_keeps_crashing_raises_instead_of_looping():
    crash = {"at_step": 1, "how": "raise", "marker": None}  # no marker: it crashes every time
    envs = ParallelVectorEnv([functools.partial(make_env, crash=crash)], max_restarts_in_a_row=2)
    envs.reset(seed=0)
    with pytest.warns(EnvCrashWarning):
        envs.step(np.array([0]))
        envs.step(np.array([0]))
        with pytest.raises(RuntimeError, match="env 0 failed 3 times in a row"):
            envs.step(np.array([0]))
    assert envs.closed


def test_factory_that_fails_is_a_clear_error():
    with pytest.raises(RuntimeError, match="env 0 could not be built.*TypeError"):
        ParallelVectorEnv([functools.partial(make_env, no_such_option=1)])


def loop_config(logdir, **run):
    # end_prob 0: every episode is truncated at exactly 12 steps, so a dropped episode that leaked
    # into the next one would show as a longer episode in the scores.
    return make_config(["debug"], {"run.logdir": str(logdir), "run.steps": 260, "run.num_envs": 2,
                                   "run.checkpoint_every": 0, **{f"run.{k}": v for k, v in run.items()}})


def scores(logdir):
    """The training episodes (the greedy ones at the end run on an env that `make_env` does not seed)."""
    return [r for r in map(json.loads, (logdir / "scores.jsonl").open()) if r["mode"] == "train"]


def test_loop_with_parallel_envs_matches_sync_envs(tmp_path):
    env_fn = functools.partial(make_env, end_prob=0.05)
    sync = loop.run(loop_config(tmp_path / "sync"), env_fn)
    par = loop.run(loop_config(tmp_path / "par", parallel_envs=True), env_fn, ParallelVectorEnv)
    assert par["env_steps"] == sync["env_steps"] == 260 and par["updates"] == sync["updates"] > 0
    key = lambda r: (r["env_step"], r["return"], r["length"])
    assert [key(r) for r in scores(tmp_path / "par")] == [key(r) for r in scores(tmp_path / "sync")]


def test_loop_survives_a_crashed_env_process_and_drops_its_episode(tmp_path):
    # env 1 (seed 1) dies in the 6th step of its second episode (its 18th step call)
    crash = {"at_step": 18, "how": "exit", "marker": str(tmp_path / "crashed")}
    env_fn = functools.partial(make_env, end_prob=0.0, crash=crash, crash_seed=1)
    with pytest.warns(EnvCrashWarning, match="env 1 crashed: the process exited with code 3"):
        summary = loop.run(loop_config(tmp_path / "run", parallel_envs=True), env_fn, ParallelVectorEnv)
    assert summary["env_steps"] == 260 and summary["updates"] > 0
    train = [r for r in scores(tmp_path / "run") if r["mode"] == "train"]
    assert all(r["length"] == 12 for r in train)
    # 130 vector steps; an episode takes 13 (12 steps and the autoreset step). Env 0 ends episodes at
    # vector steps 12, 25, ..., 129: 10. Env 1 ends its first at 12, its second is dropped at 19 (the
    # restart's first step), the next ones end at 31, 44, ..., 122: 9.
    assert len(train) == 10 + 9


def test_call_reads_attributes_and_reports_errors():
    envs = ParallelVectorEnv([functools.partial(make_env, max_steps=5 + i) for i in range(2)])
    try:
        assert envs.get_attr("max_steps") == (5, 6)
        with pytest.raises(RuntimeError, match="env 0: AttributeError"):
            envs.call("no_such_method")
        assert envs.call("max_steps") == (5, 6)  # the workers survived the error
        envs.reset(seed=0)
        with pytest.raises(RuntimeError, match="env 0 failed: the process exited with code 4"):
            envs.call("exit", 4)
        with pytest.warns(EnvCrashWarning) as record:
            obs, _, _, _, info = envs.step(np.array([0, 0]))
        assert sorted(str(w.message).split(";")[0] for w in record) == [
            f"env {i} crashed: the process exited with code 4" for i in (0, 1)]
        np.testing.assert_array_equal(info["restarted"], [True, True])
        assert envs.get_attr("max_steps") == (5, 6)  # rebuilt from their factories
    finally:
        envs.close()
