"""The non-finite guard: an update whose loss or gradients are not finite is skipped inside the
compiled train step; the host loop stops after `run.max_skipped_updates` of them in a row."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import envs
from helpers import sine_batch
from worldmodels import agent as agent_lib
from worldmodels import loop
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import make_config
from worldmodels.replay import ReplayBuffer

OBS_SPEC = {"vector": ((3,), "float32")}


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_nan_batch_leaves_the_state_unchanged_and_a_good_one_trains():
    config = make_config(["debug"]).agent
    state = agent_lib.init(config, OBS_SPEC, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(0))
    before = agent_lib.copy_state(state)
    bad = sine_batch()
    bad["vector"] = bad["vector"].copy()
    bad["vector"][1, 3, 0] = np.nan
    state, metrics, _ = agent_lib.train(state, bad, jax.random.PRNGKey(1))
    assert float(metrics["train/skipped"]) == 1.0 and not np.isfinite(float(metrics["loss/world_model"]))
    assert _leaves_equal(state, before)  # the step counter too
    state, metrics, _ = agent_lib.train(state, sine_batch(), jax.random.PRNGKey(2))
    assert float(metrics["train/skipped"]) == 0.0 and int(state.step) == 1
    assert not _leaves_equal(state.opt_state, before.opt_state)  # (its learning rate warms up from 0)


def _nan_observations_in_batches(monkeypatch, which):
    """Replay hands out batches with a NaN observation for the `which(n)`-th sample (n from 0)."""
    sample = ReplayBuffer.sample_windows
    calls = []

    def poisoned(self, *args, **kwargs):
        batch, windows = sample(self, *args, **kwargs)
        if which(len(calls)):
            batch = {**batch, "vector": batch["vector"].copy()}
            batch["vector"][0, 5, 1] = np.nan
        calls.append(1)
        return batch, windows

    monkeypatch.setattr(ReplayBuffer, "sample_windows", poisoned)


def _config(tmp_path, steps):
    return make_config(["debug"], {"run.logdir": str(tmp_path), "run.steps": steps, "run.max_skipped_updates": 5,
                                   "run.final_eval_episodes": 0})


def cartpole(seed):
    return envs.make("gym:CartPole-v1", seed=seed)


def test_one_nan_batch_is_skipped_and_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    _nan_observations_in_batches(monkeypatch, lambda n: n == 2)
    summary = loop.run(_config(tmp_path, 256), cartpole)
    assert summary["env_steps"] == 256
    logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "train/skipped_updates" in r]
    assert sum(r["train/skipped_updates"] for r in logged) == 1
    assert all(np.isfinite(r["loss/total"]) for r in logged[1:])  # the skipped update did not poison the state


def test_nan_forever_stops_the_run_naming_the_step_and_the_loss_term(tmp_path, monkeypatch):
    loop.run(_config(tmp_path, 128), cartpole)  # a good checkpoint at step 128
    _nan_observations_in_batches(monkeypatch, lambda n: True)
    with pytest.raises(loop.NonFiniteUpdatesError, match=r"5 updates in a row had a non-finite loss or gradient, "
                                                          r"the last at env step \d+ \(update \d+\); its first "
                                                          r"non-finite loss term: loss/(cont|dyn|rec_vector|rep|reward)\..*checkpoint of step "
                                                          r"128 is the last good one"):
        loop.run(_config(tmp_path, 512), cartpole)
    (saved,) = tmp_path.glob("nonfinite_batch_update*.npz")
    assert np.isnan(np.load(saved)["vector"]).any()
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps()[-1] == 128
    monkeypatch.undo()
    assert loop.run(_config(tmp_path, 256), cartpole)["env_steps"] == 256  # resumes from the good checkpoint


def test_device_loop_stops_after_max_skipped_updates_naming_the_term(tmp_path):
    """An env whose rewards are all NaN: every update is skipped; the device loop stops after
    run.max_skipped_updates of them, counting across chunks, and names the first non-finite term."""
    import jax.numpy as jnp

    import envs.jax as jenvs
    from worldmodels import device_loop

    env, params = jenvs.make("bsuite/catch/0")

    class NanRewards:
        """The catch env with NaN rewards (everything else delegated)."""

        def __getattr__(self, name):
            return getattr(env, name)

        def step(self, params, state, action, key=None):
            state, timestep = env.step(params, state, action, key)
            return state, timestep._replace(reward=timestep.reward * jnp.nan)

    config = make_config(["debug"], {"run.logdir": str(tmp_path), "run.train_start": 64, "run.steps": 512,
                                     "run.max_skipped_updates": 12, "run.train_ratio": 256.0})
    with pytest.raises(loop.NonFiniteUpdatesError, match=r"updates in a row had a non-finite loss or gradient, "
                                                        r"the last in the chunk that ended at env step \d+ "
                                                        r".*first non-finite loss term: loss/reward") as error:
        device_loop.run_on_device(config, NanRewards(), params, chunk_env_steps=8)
    assert "rerun the host loop" in str(error.value)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "train/skipped_updates" in m]
    assert trained and all(m["train/skipped_updates"] == m["train/skipped"] * (m["updates"] - p["updates"])
                           for p, m in zip(metrics, metrics[1:]) if m in trained)
    assert metrics[-1]["updates"] >= 12 and metrics[-1]["env_step"] < 512  # stopped early
