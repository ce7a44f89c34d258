"""The device loop: the host loop's step convention in the device replay, window sampling, a short
training run that compiles its chunk once, and the CLI's --device-loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs as genvs
import envs.jax as jenvs
from experiments import train as train_cli
from worldmodels import device_loop as dl
from worldmodels import loop
from worldmodels import replay as replay_lib
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import make_config


def debug_config(logdir, **run):
    return make_config(["debug"], {"run.logdir": str(logdir), **{f"run.{k}": v for k, v in run.items()}})


def _forced_reset(name, env, params, obs):
    """Reset the JAX env with the random draws read off an episode's first stored observation."""
    if name.startswith("catch"):
        board = obs.reshape(env.observation_shape)
        return env.reset(params, jax.random.PRNGKey(0), ball_column=int(np.argmax(board[0])))
    context = int(round((obs.reshape(env.observation_shape)[0, 2] + 1) / 2))  # obs[2] = 2 * context - 1
    return env.reset(params, jax.random.PRNGKey(0), context=jnp.array([context]), query=0)


@pytest.mark.parametrize("name", ["catch/0", "memory_len/0"])
def test_stored_steps_follow_the_host_step_convention(tmp_path, name):
    env, params = jenvs.make(name)
    num_envs, vector_steps = 2, 30
    config = debug_config(tmp_path, num_envs=num_envs, train_ratio=0.0, replay_capacity=1000)
    device = dl.DeviceLoop(config, env, params, chunk_env_steps=num_envs * vector_steps)
    carry, out = device.chunk(device.init(jax.random.PRNGKey(3), params), params)
    data = jax.device_get(carry.replay.data)
    assert int(carry.replay.written) == vector_steps
    out = jax.device_get(out)

    for i in range(num_envs):
        steps = {k: v[i] for k, v in data.items()}
        state, ended, episodes = None, True, 0
        for t in range(vector_steps):
            if ended:  # the step after an episode's last one starts the next (NEXT_STEP autoreset)
                assert steps["is_first"][t], (i, t)
                state, ts = _forced_reset(name, env, params, steps["vector"][t])
                assert not steps["action"][t].any()  # no action led to a first step
                episodes += 1
            else:
                assert not steps["is_first"][t], (i, t)
                action = steps["action"][t]
                assert action.sum() == 1.0 and set(np.unique(action)) <= {0.0, 1.0}  # one-hot
                state, ts = env.step(params, state, int(np.argmax(action)), jax.random.PRNGKey(0))
            np.testing.assert_array_equal(steps["vector"][t], np.asarray(ts.obs).reshape(-1))
            assert steps["reward"][t] == float(ts.reward)
            ended = bool(ts.terminated | ts.truncated)
            assert steps["is_last"][t] == ended and steps["is_terminal"][t] == bool(ts.terminated)
            # the chunk reports the episode's return at its last step (output t is the step stored at t + 1)
            if t >= 1 and steps["is_last"][t]:
                start = t - np.flatnonzero(steps["is_first"][:t + 1])[-1]
                assert out.is_last[t - 1, i]
                assert out.episode_return[t - 1, i] == steps["reward"][t - start:t + 1].sum()
                assert out.episode_length[t - 1, i] == start
        assert episodes >= 3  # several episodes, so resets are exercised


def test_sampled_windows_read_only_written_steps_in_order():
    num_envs, capacity, seq_len = 2, 8, 3
    replay = replay_lib.replay_init({"x": ((), "int32")}, num_envs, capacity)
    sample = jax.jit(lambda r, k: replay_lib.replay_sample(r, 512, seq_len, k)["x"])
    for written in range(1, 20):
        # env e's step number w (counting from 1) is stored as 1000 * e + w; unwritten slots stay 0
        replay = replay_lib.replay_add(replay, {"x": jnp.array([w * 1000 + written for w in range(num_envs)])})
        if written < seq_len:
            continue
        x = np.asarray(sample(replay, jax.random.PRNGKey(written)))
        env, step = np.divmod(x, 1000)
        oldest = max(1, written - capacity + 1)
        assert (step >= oldest).all() and (step <= written).all(), written  # written, not overwritten
        assert (np.diff(step, axis=1) == 1).all() and (np.diff(env, axis=1) == 0).all()  # one stream, in order
        # uniform over every valid window: all (env, start) pairs appear
        valid = num_envs * (min(written, capacity) - seq_len + 1)
        assert len(set(zip(env[:, 0], step[:, 0]))) == valid


def test_replay_update_writes_into_the_sampled_windows_only():
    replay = replay_lib.replay_init({"x": ((), "int32"), "y": ((), "int32")}, 2, 8)
    for w in range(1, 12):  # wraps: slots hold steps 4..11
        replay = replay_lib.replay_add(replay, {"x": jnp.array([w, 1000 + w]), "y": jnp.array([w, w])})
    batch, (env, slots) = replay_lib.replay_sample_windows(replay, 6, 4, jax.random.PRNGKey(0))
    updated = replay_lib.replay_update(replay, env, slots, {"x": -batch["x"][:, 1:]}, offset=1)
    marked = {(int(e), int(s)) for e, row in zip(env, slots) for s in row[1:]}
    old, new = np.asarray(replay.data["x"]), np.asarray(updated.data["x"])
    for e in range(2):
        for s in range(8):
            assert new[e, s] == (-old[e, s] if (e, s) in marked else old[e, s])
    np.testing.assert_array_equal(updated.data["y"], replay.data["y"])
    assert int(updated.written) == int(replay.written) and 0 < len(marked) < 16


def test_schedule_follows_train_ratio():
    # 4 x 16 = 64 replayed steps per update
    assert dl.make_schedule(16.0, 4, 16, 1, 128) == dl.Schedule(blocks=32, steps_per_block=4, updates_per_block=1,
                                                                 num_envs=1)
    assert dl.make_schedule(64.0, 4, 16, 2, 128) == dl.Schedule(64, 1, 2, 2)  # 2 updates per vector step
    s = dl.make_schedule(0.0, 4, 16, 2, 100)  # no training: one block of the whole chunk
    assert (s.blocks, s.steps_per_block, s.updates_per_block) == (1, 50, 0)
    assert dl.make_schedule(16.0, 4, 16, 1, 128).effective_train_ratio(4, 16) == 16.0


def test_loops_of_one_program_share_its_compiled_functions(tmp_path):
    env, params = jenvs.make("catch/0")
    first = dl.DeviceLoop(debug_config(tmp_path / "a", steps=256, train_ratio=16.0), env, params, 64)
    # another run dir, budget, seed and evaluation: the same program
    again = dl.DeviceLoop(debug_config(tmp_path / "b", steps=1024, seed=3, eval_every=128, train_ratio=16.0),
                          jenvs.make("catch/0")[0], params, 64)
    assert again.chunk is first.chunk and again._evaluate_jit is first._evaluate_jit
    # what the chunk computes differs: its own program
    for other in (dl.DeviceLoop(debug_config(tmp_path / "a", steps=256, train_ratio=32.0), env, params, 64),
                  dl.DeviceLoop(debug_config(tmp_path / "a", steps=256, train_ratio=16.0), env, params, 128),
                  dl.DeviceLoop(debug_config(tmp_path / "a", steps=256, train_ratio=16.0),
                                jenvs.make("memory_len/0")[0], jenvs.make("memory_len/0")[1], 64)):
        assert other.chunk is not first.chunk


def test_short_training_run_compiles_once_and_writes_logs(tmp_path):
    env, params = jenvs.make("catch/0")
    config = debug_config(tmp_path, steps=256, train_ratio=16.0)  # one update every 4 env steps
    before = dl.TRACE_COUNTS["chunk"]
    summary = loop.run_on_device(config, env, params, chunk_env_steps=64)
    assert dl.TRACE_COUNTS["chunk"] - before == 1  # four chunks, one trace
    assert summary["env_steps"] == 256
    assert summary["updates"] == (256 - 64) // 4 + 1  # from train_start (64 steps) on, one per 4 steps
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [m["env_step"] for m in metrics] == [64, 128, 192, 256]
    trained = [m for m in metrics if "loss/total" in m]
    assert len(trained) == 4  # the first chunk's last block reaches train_start
    assert all(np.isfinite(m[k]) for m in trained for k in m if k.startswith("loss/"))
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").open()]
    train = [s for s in scores if s["mode"] == "train"]
    assert len(train) == summary["episodes"] >= 256 // 10
    assert all(s["length"] == 9 and s["return"] in (-1.0, 1.0) for s in scores)  # catch: 9 steps, +-1
    # the run ends with greedy episodes (run.final_eval_episodes), in the summary too
    final = [s["return"] for s in scores if s["mode"] == "eval"]
    assert [s["env_step"] for s in scores if s["mode"] == "eval"] == [256] * config.run.final_eval_episodes
    assert summary["eval_returns"] == final
    assert [s["env_step"] for s in scores] == sorted(s["env_step"] for s in scores)


def test_resumed_run_equals_uninterrupted_run_and_evaluation_leaves_training_alone(tmp_path):
    env, params = jenvs.make("catch/0")
    common = {"train_ratio": 16.0, "checkpoint_every": 64}
    # A: 256 steps in one go, with greedy evaluations; B: 128 steps, stopped, resumed to 256, no evaluation.
    a = loop.run_on_device(debug_config(tmp_path / "a", steps=256, eval_every=128, eval_episodes=3, **common),
                           env, params, chunk_env_steps=64)
    first = loop.run_on_device(debug_config(tmp_path / "b", steps=128, **common), env, params, chunk_env_steps=64)
    assert first["env_steps"] == 128
    b = loop.run_on_device(debug_config(tmp_path / "b", steps=256, **common), env, params, chunk_env_steps=64)
    assert (tmp_path / "b" / "checkpoints" / "256").is_dir()
    with Checkpointer(tmp_path / "b" / "checkpoints") as ckpt:  # only the 256 stored steps (1 env)
        assert ckpt.array_specs()["agent"][("carry", "replay", "data", "reward")] == ((1, 256), "float32")
    assert a["env_steps"] == b["env_steps"] == 256 and a["updates"] == b["updates"] > 0
    for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a["replay"]), jax.tree.leaves(b["replay"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    read = lambda run: [{k: v for k, v in json.loads(line).items() if k != "time"}
                        for line in (tmp_path / run / "scores.jsonl").open()]
    scores_a, scores_b = read("a"), read("b")
    assert [s for s in scores_a if s["mode"] == "train"] == [s for s in scores_b if s["mode"] == "train"]
    evals = [s for s in scores_a if s["mode"] == "eval"]
    # every 128 steps 3 episodes, and 5 at the end of each call that reached its budget
    assert [s["env_step"] for s in evals] == [128] * 3 + [256] * 3 + [256] * 5
    assert [s["env_step"] for s in scores_b if s["mode"] == "eval"] == [128] * 5 + [256] * 5
    assert all(s["length"] == 9 and s["return"] in (-1.0, 1.0) for s in evals)  # whole catch episodes
    # The host loop cannot resume a device-loop run: a clear error, and the saved config stays.
    saved = (tmp_path / "b" / "config.json").read_text()
    with pytest.raises(loop.ConfigMismatchError, match="run of the device loop"):
        loop.run(debug_config(tmp_path / "b", steps=320, **common), lambda seed: genvs.make("bsuite/catch/0", seed=seed))
    assert (tmp_path / "b" / "config.json").read_text() == saved


def test_evaluate_runs_each_episode_once_to_its_end():
    env, params = jenvs.make("memory_len/4")  # memory length 5: 6-step episodes, reward at the last step
    device = dl.DeviceLoop(debug_config("unused"), env, params)
    agent = device.init(jax.random.PRNGKey(0), params).agent
    returns, lengths = device.evaluate(agent, params, jax.random.PRNGKey(1), episodes=7)
    assert lengths.tolist() == [6] * 7 and set(returns.tolist()) <= {-1.0, 1.0}
    again = device.evaluate(agent, params, jax.random.PRNGKey(1), episodes=7)
    np.testing.assert_array_equal(returns, again[0])  # the key decides everything
    returns, lengths = device.evaluate(agent, params, jax.random.PRNGKey(1), episodes=2, max_steps=3)
    assert lengths.tolist() == [3, 3] and returns.tolist() == [0.0, 0.0]  # cut off before the reward


def test_cli_device_loop(tmp_path):
    summary = train_cli.main(["--env", "bsuite/memory_len/0", "--preset", "debug", "--device-loop",
                              "--run.logdir", str(tmp_path), "--run.steps", "40", "--run.train-ratio", "0"])
    assert summary["env_steps"] >= 40 and summary["episodes"] >= 10  # memory_len/0: 2-step episodes
    with pytest.raises(SystemExit, match="no JAX-native"):
        train_cli.main(["--env", "gym:CartPole-v1", "--preset", "debug", "--device-loop",
                        "--run.logdir", str(tmp_path / "b")])
