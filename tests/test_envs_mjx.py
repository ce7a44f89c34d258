"""The DMC suite on MJX (`envs.jax.mjx`): the adapter's protocol, its drift from dm_control, the device
loop on it (training, exact resume, one trace), and the host loop through the gymnasium wrapper."""

import json
import pickle

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("mujoco_playground")

import envs  # noqa: E402
import envs.jax as jenvs  # noqa: E402
from envs.jax import mjx as mjx_envs  # noqa: E402
from experiments import mjx_parity  # noqa: E402
from experiments import train as train_cli  # noqa: E402
from worldmodels import device_loop as dl  # noqa: E402
from worldmodels import loop  # noqa: E402
from worldmodels.config import make_config  # noqa: E402


def debug_config(logdir, **run):
    return make_config(["debug"], {"run.logdir": str(logdir), **{f"run.{k}": v for k, v in run.items()}})


@pytest.mark.parametrize("task", ["cartpole-swingup", "walker-walk", "cheetah-run", "reacher-easy", "finger-spin"])
def test_spaces_match_dm_control(task):
    suite = pytest.importorskip("dm_control.suite")  # not on Python 3.13: labmaze has no wheel there

    env, params = jenvs.make(f"mjx/{task}")
    assert params == () and hash(env) == hash(mjx_envs.MjxSuite(task))  # a static jit argument
    domain, name = task.split("-", 1)
    reference = suite.load(domain, name)
    assert env.action_size == reference.action_spec().shape[0]
    assert np.all(reference.action_spec().minimum == -1) and np.all(reference.action_spec().maximum == 1)
    size = sum(int(np.prod(spec.shape)) for spec in reference.observation_spec().values())
    assert env.observation_shape == (size,)
    _, timestep = jax.eval_shape(env.reset, params, jax.random.PRNGKey(0))
    assert timestep.obs.shape == (size,) and timestep.obs.dtype == jnp.float32


def test_episodes_are_500_steps_of_2_control_steps_then_reset():
    env, params = jenvs.make("mjx/cartpole-balance")
    auto = jenvs.AutoReset(env)

    @jax.jit
    def rollout(key):
        state, first = auto.reset(params, key)
        actions = jnp.zeros((502, env.action_size))

        def body(state, inputs):
            action, key = inputs
            return auto.step(params, state, action, key)
        return first, jax.lax.scan(body, state, (actions, jax.random.split(key, 502)))[1]

    first, steps = rollout(jax.random.PRNGKey(0))
    assert bool(first.first) and first.obs.shape == (5,)
    ended = np.flatnonzero(np.asarray(steps.truncated))
    assert ended.tolist() == [499]  # the 500th step truncates: 1000 control steps
    assert not np.asarray(steps.terminated).any() and not np.asarray(steps.first[:500]).any()
    assert bool(steps.first[500]) and not bool(steps.first[501])  # then a fresh episode
    assert float(steps.reward[500]) == 0.0
    rewards = np.asarray(steps.reward[:500])
    assert np.all((rewards >= 0) & (rewards <= 2))  # two control steps of reward in [0, 1]
    assert rewards[:10].min() > 1.9 and rewards[-1] < 1.5  # starts near upright; with no force the pole falls


def test_one_step_is_two_playground_steps_with_rewards_summed():
    env, params = jenvs.make("mjx/cartpole-swingup")
    physics_env = env.physics_env
    state, _ = jax.jit(env.reset)(params, jax.random.PRNGKey(3))
    action = jnp.ones(env.action_size)
    after, timestep = jax.jit(env.step)(params, state, action * 1.5, jax.random.PRNGKey(0))  # clipped to [-1, 1]

    @jax.jit
    def two_steps(physics):
        one = physics_env.step(physics, action)
        return one, physics_env.step(one, action)
    one, two = two_steps(state.physics)
    np.testing.assert_allclose(np.asarray(timestep.obs), np.asarray(two.obs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(timestep.reward), float(one.reward + two.reward), rtol=1e-5, atol=1e-6)
    assert float(one.reward) != float(timestep.reward)  # both steps' rewards count
    assert int(after.control_steps) == 2 and not bool(timestep.truncated | timestep.terminated)


def test_cartpole_agrees_with_dm_control_for_100_steps():
    # MJX steps cartpole in float32 with Euler, dm_control in float64 with RK4 (the models' integrators
    # differ): equal at reset, close for the first steps, a slow drift after (errors seen: obs 2.5e-3 /
    # 3.2e-3 over 10 steps, 4.7e-2 / 1.3e-2 over 100; rewards 5e-5 / 2e-5, then 1.8e-2 / 2.9e-3)
    pytest.importorskip("dm_control")
    for task in ("cartpole-balance", "cartpole-swingup"):
        drift = mjx_parity.drift(task, steps=100)
        assert drift.obs_error_at_reset < 1e-5, drift
        assert drift.obs_error_first10 < 1e-2 and drift.reward_error_first10 < 1e-3, drift
        assert drift.obs_error < 0.1 and drift.reward_error < 0.05, drift


def test_device_loop_trains_on_mjx_and_resumes_exactly(tmp_path):
    env, params = jenvs.make("mjx/cartpole-balance")
    common = {"train_ratio": 16.0, "checkpoint_every": 64, "num_envs": 4, "final_eval_episodes": 0}
    traces = dl.TRACE_COUNTS["chunk"]
    a = loop.run_on_device(debug_config(tmp_path / "a", steps=256, **common), env, params, chunk_env_steps=64)
    loop.run_on_device(debug_config(tmp_path / "b", steps=128, **common), env, params, chunk_env_steps=64)
    b = loop.run_on_device(debug_config(tmp_path / "b", steps=256, **common), env, params, chunk_env_steps=64)
    assert dl.TRACE_COUNTS["chunk"] == traces + 1  # 8 chunks in three runs of one program: one trace
    assert a["env_steps"] == b["env_steps"] == 256 and a["updates"] == b["updates"] > 0
    for x, y in zip(jax.tree.leaves((a["state"], a["replay"])), jax.tree.leaves((b["state"], b["replay"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    actions = np.asarray(a["replay"].data["action"])
    assert actions.shape[-1] == 1 and np.all(np.abs(actions) <= 1) and np.unique(actions).size > 10  # continuous
    rewards = np.asarray(a["replay"].data["reward"])
    assert rewards.max() > 1.0  # real cartpole rewards (two control steps of up to 1)


def test_vision_draws_camera_0_of_each_world_in_one_batched_call():
    env, params = jenvs.make("mjx-vision/cartpole-swingup")
    assert env.vision and env.impl == "warp" and env.observation_shape == (64, 64, 3)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    _, one = jax.jit(env.reset)(params, keys[0])
    states, first = jax.jit(jax.vmap(env.reset, in_axes=(None, 0)))(params, keys)
    assert one.obs.shape == (64, 64, 3) and one.obs.dtype == jnp.uint8 and first.obs.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(one.obs, first.obs[0])  # alone or as world 0 of 3: the same image
    step = jax.jit(jax.vmap(env.step, in_axes=(None, 0, 0, 0)))
    frames = [first.obs]
    for _ in range(20):  # push the cart right in world 0, left in the others
        states, timestep = step(params, states, jnp.array([[1.0], [-1.0], [-1.0]]), keys)
        frames.append(timestep.obs)
    frames = np.asarray(frames, np.int32)  # [T, worlds, H, W, 3]
    assert 0 < frames.mean() < 255 and frames.std() > 20  # a scene, not a blank frame
    moved = np.abs(frames[-1] - frames[0]).mean(axis=(1, 2, 3))
    assert np.all(moved > 1.0), moved  # the cart and pole move in every world's images
    assert np.abs(frames[-1, 0] - frames[-1, 1]).mean() > 1.0  # pushed apart, drawn apart

    # the image follows the cart: its orange pixels' mean column (31.5 at the start, the middle) moves
    # right in world 0 and left in world 1
    def cart_column(image):
        orange = image[..., 0] - image[..., 2] > 50  # the floor is grey, the sky black
        return np.nonzero(orange)[1].mean()

    assert abs(cart_column(frames[0, 0]) - 31.5) < 2
    assert cart_column(frames[-1, 0]) > 36 and cart_column(frames[-1, 1]) < 27

    host = envs.make("mjx-vision/cartpole-swingup", seed=3)  # the host loop's view: a gymnasium env
    assert host.observation_space == gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    obs, _ = host.reset()
    assert obs.dtype == np.uint8 and host.observation_space.contains(obs) and obs.std() > 20
    assert host.step(np.array([1.0], np.float32))[0].dtype == np.uint8


def test_device_loop_trains_on_mjx_images_and_resumes_exactly(tmp_path):
    env, params = mjx_envs.MjxSuite("cartpole-swingup", impl="warp", vision=True, image_size=16), ()  # small: fast
    common = {"train_ratio": 8.0, "checkpoint_every": 32, "num_envs": 2, "final_eval_episodes": 0}
    a = loop.run_on_device(debug_config(tmp_path / "a", steps=96, **common), env, params, chunk_env_steps=32)
    loop.run_on_device(debug_config(tmp_path / "b", steps=64, **common), env, params, chunk_env_steps=32)
    b = loop.run_on_device(debug_config(tmp_path / "b", steps=96, **common), env, params, chunk_env_steps=32)
    assert a["updates"] == b["updates"] > 0
    for x, y in zip(jax.tree.leaves((a["state"], a["replay"])), jax.tree.leaves((b["state"], b["replay"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    chunk = next(f for (name, _), f in reversed(dl._PROGRAMS.items()) if name == "chunk")
    assert chunk._cache_size() == 1  # the resumed run's restored (committed) carry reused the fresh run's compile
    images = np.asarray(a["replay"].data["image"])[:, :48]  # [envs, stored steps, 16, 16, 3]
    assert images.dtype == np.uint8 and images.std() > 20
    assert np.abs(np.diff(images.astype(np.int32), axis=1)).mean() > 0.1  # the stored frames change


def test_host_loop_runs_the_same_task_through_gymnasium(tmp_path):
    from gymnasium.utils.env_checker import check_env

    env = envs.make("mjx/cartpole-balance", seed=5)
    check_env(env, skip_render_check=True)
    first, _ = env.reset(seed=5)
    again, _ = envs.make("mjx/cartpole-balance").reset(seed=5)
    np.testing.assert_array_equal(first, again)  # equal seeds, equal episodes
    for _ in range(3):
        env.step(np.array([0.5], np.float32))
    copy = pickle.loads(pickle.dumps(env))  # the host loop's checkpoints hold picklable envs
    np.testing.assert_array_equal(copy.step(np.array([-0.3], np.float32))[0], env.step(np.array([-0.3], np.float32))[0])
    summary = loop.run(debug_config(tmp_path, steps=96, train_start=64, train_ratio=32.0),
                       lambda seed: envs.make("mjx/cartpole-balance", seed=seed))
    assert summary["env_steps"] == 96 and summary["updates"] > 0
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").open()]
    assert scores and all(s["length"] == 500 for s in scores if s["mode"] == "eval")  # truncated at 500


def test_bad_names_and_a_missing_extra_are_clear_errors(monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown MJX task 'walker-jump'.*walker-walk"):
        jenvs.make("mjx/walker-jump")
    with pytest.raises(ValueError, match="unknown MJX implementation 'cuda'"):
        mjx_envs.MjxSuite("cartpole-balance", impl="cuda")
    with pytest.raises(SystemExit, match="use mjx/walker-walk "):
        train_cli.main(["--env", "dmc/walker-walk", "--device-loop", "--run.steps", "8"])
    with pytest.raises(SystemExit, match="dmc-vision/ is dm_control's, stepped on the host: use "
                                         "mjx-vision/walker-walk .* or drop --device-loop"):
        train_cli.main(["--env", "dmc-vision/walker-walk", "--device-loop", "--run.steps", "8"])
    with pytest.raises(ValueError, match="vision needs impl='warp'"):
        mjx_envs.MjxSuite("cartpole-balance", vision=True)
    # MuJoCo Warp's FFI calls cannot be partitioned over devices (XLA refuses): one device, said clearly
    from worldmodels import sharding
    monkeypatch.setattr(sharding, "data_size", lambda mesh: 2)  # as if 2 devices
    warp_env = mjx_envs.MjxSuite("cartpole-balance", impl="warp")
    assert mjx_envs.MjxSuite("cartpole-balance").partitionable and not warp_env.partitionable
    with pytest.raises(ValueError, match=r"cannot be split over the 2 devices .*--run.mesh data=1"):
        dl.DeviceLoop(debug_config("unused", num_envs=2), warp_env, ())
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mujoco_playground"
                        else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'worldmodels\[mjx\]'"):
        mjx_envs._import_playground()
