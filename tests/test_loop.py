"""The host loop end to end: a short run, checkpoint/resume equality, config and CLI errors."""

import json
import threading

import gymnasium as gym
import jax
import numpy as np
import pytest

import envs
from experiments import train as train_cli
from worldmodels import loop, spaces
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import make_config
from worldmodels.logging import RunLogger, read_jsonl


def cartpole(seed):
    return envs.make("gym:CartPole-v1", seed=seed)


def debug_config(logdir, steps, **run):
    return make_config(["debug"], {"run.logdir": str(logdir), "run.steps": steps,
                                   **{f"run.{k}": v for k, v in run.items()}})


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = loop.run(debug_config(tmp_path / "a", 320), cartpole)
    first = loop.run(debug_config(tmp_path / "b", 160), cartpole)
    assert first["env_steps"] == 160
    resumed = loop.run(debug_config(tmp_path / "b", 320), cartpole)
    assert resumed["env_steps"] == straight["env_steps"] == 320
    assert resumed["updates"] == straight["updates"] > 0
    assert leaves_equal(straight["state"], resumed["state"])
    scores = lambda d, mode: [(r["env_step"], r["return"]) for r in map(json.loads, (d / "scores.jsonl").open())
                              if r["mode"] == mode]
    assert scores(tmp_path / "a", "train") == scores(tmp_path / "b", "train")
    assert len(scores(tmp_path / "a", "train")) > 3
    assert resumed["recent_return"] == straight["recent_return"]  # the recent returns were checkpointed
    # each run that reached its budget ended with greedy episodes, and they did not change training
    assert [s for s, _ in scores(tmp_path / "a", "eval")] == [320] * 5
    assert [s for s, _ in scores(tmp_path / "b", "eval")] == [160] * 5 + [320] * 5
    assert straight["eval_return"] == pytest.approx(np.mean([r for _, r in scores(tmp_path / "a", "eval")]))
    assert straight["recent_episodes"] == len([s for s, _ in scores(tmp_path / "a", "train")
                                               if s > 320 - straight["recent_window_steps"]])


class _UnpicklableOnLoad(gym.Wrapper):
    """Pickles, but fails to unpickle (as bsuite's CSV-recording wrapper does)."""

    def __setstate__(self, state):
        raise RecursionError("cannot rebuild")


def test_resume_with_envs_that_fail_to_unpickle_restarts_their_episodes(tmp_path):
    env_fn = lambda seed: _UnpicklableOnLoad(cartpole(seed))
    loop.run(debug_config(tmp_path, 100), env_fn)
    with pytest.warns(UserWarning, match="could not be unpickled"):
        resumed = loop.run(debug_config(tmp_path, 200), env_fn)
    assert resumed["env_steps"] == 200
    steps = [r["env_step"] for r in map(json.loads, (tmp_path / "scores.jsonl").open())]
    assert steps == sorted(steps) and steps[-1] > 100


def test_run_writes_logs_and_checkpoints(tmp_path):
    config = debug_config(tmp_path, 300, num_envs=2, eval_every=200, eval_episodes=1, log_every=100)
    summary = loop.run(config, cartpole)
    assert summary["env_steps"] == 300 and summary["updates"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert metrics and all(np.isfinite(m["loss/world_model"]) for m in metrics if "loss/world_model" in m)
    modes = {json.loads(line)["mode"] for line in (tmp_path / "scores.jsonl").open()}
    assert modes == {"train", "eval"}
    assert json.loads((tmp_path / "config.json").read_text())["run"]["num_envs"] == 2
    # The exit checkpoint holds the 150 steps per env that replay stores, not its whole ring.
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 300 and ckpt.read_meta()["replay_stored"] == 150
        replay = ckpt.array_specs()["replay"]
    assert replay[("data/reward",)] == ((2, 150), "float32")
    assert replay[("data/vector",)] == ((2, 150, 4), "float32")


def test_train_step_compiles_once_in_the_background_during_train_start(tmp_path):
    lower, compile_ = "/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration"
    events = []  # (event, thread) of every lowering and XLA compile of the train step (a retrace adds one)

    def listener(event, duration, **kwargs):
        if event in (lower, compile_) and kwargs.get("fun_name") == "jit(_train)":
            events.append((event, threading.current_thread().name))

    def run(steps):
        events.clear()
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:  # batch shapes no other test uses, so jit's in-memory cache cannot already hold the program
            return loop.run(debug_config(tmp_path, steps, batch_size=3, seq_len=5, train_start=40), cartpole)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)

    def lowered_here_compiled_in_background():
        return (len(events) == 2 and events[0] == (lower, "MainThread") and events[1][0] == compile_
                and events[1][1].startswith("compile-train"))

    # A thread-local JAX setting is part of jit's cache key: the loop lowers in the caller's thread, under
    # it, and only XLA's compile runs in the background.
    with jax.default_device(jax.devices()[0]):
        summary = run(120)
    assert summary["updates"] > 1
    assert lowered_here_compiled_in_background(), events
    # Resuming compiles for the restored state and key, which are committed to a device (part of jit's
    # cache key): the updates then find the program.
    resumed = run(200)
    assert resumed["updates"] > summary["updates"]
    assert lowered_here_compiled_in_background(), events


def test_resuming_with_another_agent_config_is_refused(tmp_path):
    loop.run(debug_config(tmp_path, 70), cartpole)
    other = make_config(["debug"], {"run.logdir": str(tmp_path), "run.steps": 100,
                                    "agent.world_model.units": 48})
    with pytest.raises(loop.ConfigMismatchError, match="another config"):
        loop.run(other, cartpole)


def test_resuming_with_another_replay_or_schedule_is_refused_and_keeps_the_saved_config(tmp_path):
    loop.run(debug_config(tmp_path, 70), cartpole)
    saved = (tmp_path / "config.json").read_text()
    for change in ({"seq_len": 8}, {"replay_context": False}, {"train_ratio": 128.0}, {"seed": 3}):
        with pytest.raises(loop.ConfigMismatchError, match=f"run.{next(iter(change))} is"):
            loop.run(debug_config(tmp_path, 100, **change), cartpole)
        assert (tmp_path / "config.json").read_text() == saved
    loop.run(debug_config(tmp_path, 100, log_every=10, eval_every=50, eval_episodes=1), cartpole)  # allowed


def test_logger_drops_records_after_the_step_it_restarts_from(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        logger.metrics(step, {"x": step})
        logger.score(step + 5, "train", 1.0, 3)
    logger.close()
    logger = RunLogger(tmp_path, tensorboard=False, start_step=20)  # the last checkpoint was at step 20
    logger.metrics(30, {"x": -30})
    logger.close()
    assert [(r["env_step"], r["x"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(10, 10), (20, 20), (30, -30)]
    assert [r["env_step"] for r in read_jsonl(tmp_path / "scores.jsonl")] == [15]


def test_cli_rejects_unknown_preset_and_key(capsys):
    with pytest.raises(SystemExit, match="valid presets: .*size12m"):
        train_cli.parse(["--preset", "size13m"])
    with pytest.raises(SystemExit):
        train_cli.parse(["--run.stepz", "5"])
    assert "stepz" in capsys.readouterr().err


def test_cli_resolves_presets_env_and_overrides():
    config = train_cli.parse(["--preset", "size12m", "--env", "bsuite/catch/0", "--run.steps", "123"])
    assert config.agent.world_model.sequence.rssm.deter == 2048
    assert config.run.env == "bsuite/catch/0" and config.run.steps == 123


def test_spaces_dict_discrete_and_errors():
    space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8),
                             "pos": gym.spaces.Box(-1, 1, (2, 2)), "id": gym.spaces.Discrete(3)})
    assert spaces.obs_spec(space) == {"image": ((8, 8, 3), "uint8"), "pos": ((4,), "float32"),
                                      "id": ((3,), "float32")}
    batch = spaces.batch_obs(space, {"image": np.zeros((2, 8, 8, 3), np.uint8), "pos": np.ones((2, 2, 2)),
                                     "id": np.array([0, 2])}, 2)
    np.testing.assert_array_equal(batch["id"], [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(TypeError, match="unsupported observation space"):
        spaces.obs_spec(gym.spaces.Text(5))
    with pytest.raises(TypeError, match="unsupported action space"):
        spaces.action_spec(gym.spaces.MultiDiscrete([2, 3]))
    box = gym.spaces.Box(np.array([0.0, -2.0]), np.array([1.0, 2.0]))
    np.testing.assert_allclose(spaces.env_actions(box, np.array([[-1.0, 1.0], [0.0, 0.0]])),
                               [[0.0, 2.0], [0.5, 0.0]])
