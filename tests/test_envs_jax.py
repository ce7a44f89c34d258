"""JAX-native bsuite envs (`envs.jax`) against bsuite's own envs, step by step.

Each parity test plays episodes in the bsuite env (Python), reads the random draws it made at
reset (memory context/query, catch ball column), replays the same draws and actions in the JAX env
(vmapped over episodes, `lax.scan` over steps, jitted) and asserts identical observations, rewards
(bsuite's float64 reward rounded to float32) and episode ends.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bsuite import sweep
from bsuite.bsuite import EXPERIMENT_NAME_TO_ENVIRONMENT

import envs.jax as jenvs

EPISODES = 40  # per id and policy


def _bsuite_env(bsuite_id: str, seed: int):
    """The raw bsuite env of `bsuite_id` (no logging), its per-episode randomness seeded by `seed`."""
    experiment = bsuite_id.split(sweep.SEPARATOR)[0]
    loader = EXPERIMENT_NAME_TO_ENVIRONMENT[experiment]
    kwargs = dict(sweep.SETTINGS[bsuite_id])
    if "seed" in inspect.signature(loader).parameters:
        kwargs["seed"] = seed
    return loader(**kwargs)


# policy(draw, t, rng) -> action; `draw` is what the env drew at reset (see _DRAWS).
Policy = Callable[[dict, int, np.random.Generator], int]

_DRAWS = {  # experiment -> reads the bsuite env's draws after reset() (the JAX reset's forced options)
    "memory_len": lambda env: {"context": np.array(env._context), "query": np.array(env._query)},
    "memory_size": lambda env: {"context": np.array(env._context), "query": np.array(env._query)},
    "catch": lambda env: {"ball_column": np.array(env._ball_x)},
    "discounting_chain": lambda env: {},
}


def _play(bsuite_id: str, policy: Policy, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """`_play_bsuite` plus each episode's reset observation, all stacked over episodes."""
    env = _bsuite_env(bsuite_id, seed)
    read_draws = _DRAWS[bsuite_id.split(sweep.SEPARATOR)[0]]
    rng = np.random.default_rng(seed)
    rec: dict[str, list] = {k: [] for k in ("obs0", "actions", "obs", "rewards", "terminated", "truncated")}
    draws: list[dict] = []
    ts = None
    for episode in range(episodes):
        # Alternate explicit resets with bsuite's own autoreset (a step after LAST).
        ts = env.reset() if ts is None or episode % 2 == 0 else env.step(0)
        assert ts.first()
        draws.append(read_draws(env))
        rec["obs0"].append(ts.observation)
        steps: dict[str, list] = {k: [] for k in ("actions", "obs", "rewards", "terminated", "truncated")}
        while not ts.last():
            action = int(policy(draws[-1], len(steps["actions"]), rng))
            ts = env.step(action)
            steps["actions"].append(action)
            steps["obs"].append(ts.observation)
            steps["rewards"].append(np.float32(ts.reward))
            steps["terminated"].append(ts.last() and ts.discount == 0)
            steps["truncated"].append(ts.last() and ts.discount > 0)
        for k, v in steps.items():
            rec[k].append(np.array(v))
    lengths = {len(a) for a in rec["actions"]}
    assert len(lengths) == 1, f"{bsuite_id}: episodes of different lengths {lengths}"
    out = {k: np.stack(v) for k, v in rec.items()}
    out["draws"] = {k: np.stack([d[k] for d in draws]) for k in draws[0]}
    return out


@functools.lru_cache(maxsize=None)
def _rollout_fn(bsuite_id: str):
    """jit(vmap over episodes of: reset with forced draws, then `lax.scan` of steps), one per id."""
    env, params = jenvs.make(bsuite_id)

    @jax.jit
    def rollouts(draws, actions, keys):
        def one(draws, actions, key):
            reset_key, key = jax.random.split(key)
            state, first = env.reset(params, reset_key, **draws)

            def body(state, inputs):
                action, step_key = inputs
                return env.step(params, state, action, step_key)

            step_keys = jax.random.split(key, actions.shape[0])
            return first, jax.lax.scan(body, state, (actions, step_keys))[1]

        return jax.vmap(one)(draws, actions, keys)

    return rollouts


def _jax_rollouts(bsuite_id: str, draws: dict[str, np.ndarray], actions: np.ndarray):
    """Replay forced draws and actions [E, T] in the JAX env: (reset TimeStep [E], TimeSteps [E, T])."""
    keys = jax.random.split(jax.random.PRNGKey(0), actions.shape[0])
    return jax.device_get(_rollout_fn(bsuite_id)(draws, jnp.asarray(actions, jnp.int32), keys))


def _assert_parity(bsuite_id: str, policy: Policy, seed: int = 0, episodes: int = EPISODES) -> np.ndarray:
    """Both envs agree on every step; returns bsuite's rewards [E, T] for further checks."""
    ref = _play(bsuite_id, policy, episodes, seed)
    first, steps = _jax_rollouts(bsuite_id, ref["draws"], ref["actions"])
    env, _ = jenvs.make(bsuite_id)
    assert first.obs.shape == (episodes, *env.observation_shape)
    assert first.obs.dtype == np.float32 and steps.obs.dtype == np.float32
    np.testing.assert_array_equal(first.obs, ref["obs0"], err_msg=f"{bsuite_id}: reset observation")
    assert first.first.all() and not first.terminated.any() and (first.reward == 0).all()
    np.testing.assert_array_equal(steps.obs, ref["obs"], err_msg=f"{bsuite_id}: step observations")
    np.testing.assert_array_equal(steps.reward, ref["rewards"], err_msg=f"{bsuite_id}: rewards")
    np.testing.assert_array_equal(steps.terminated, ref["terminated"], err_msg=f"{bsuite_id}: terminated")
    np.testing.assert_array_equal(steps.truncated, ref["truncated"], err_msg=f"{bsuite_id}: truncated")
    assert not steps.first.any()
    assert ref["terminated"][:, -1].all(), "every bsuite episode ends by termination"
    return ref["rewards"]


def _random(num_actions: int) -> Policy:
    return lambda draws, t, rng: rng.integers(num_actions)


# memory_len ids 0, 1, 9, 15, 22: memory lengths 1, 2, 10, 30, 100.
MEMORY_LEN_IDS = ["memory_len/0", "memory_len/1", "memory_len/9", "memory_len/15", "memory_len/22"]


@pytest.mark.parametrize("bsuite_id", MEMORY_LEN_IDS + ["memory_size/0", "memory_size/4"])
def test_memory_chain_parity(bsuite_id):
    length = jenvs.make(bsuite_id)[1].memory_length
    rewards = _assert_parity(bsuite_id, _random(2), seed=1)
    assert set(rewards[:, -1]) == {-1.0, 1.0} and (rewards[:, :-1] == 0).all()
    assert rewards.shape[1] == length + 1

    def perfect(draws, t, rng):  # random until the decision, then the queried context bit
        return draws["context"][draws["query"]] if t == length else rng.integers(2)

    assert (_assert_parity(bsuite_id, perfect, seed=2)[:, -1] == 1.0).all()
    assert (_assert_parity(bsuite_id, lambda d, t, r: 1 - perfect(d, t, r), seed=3)[:, -1] == -1.0).all()


@pytest.mark.parametrize("bsuite_id", ["discounting_chain/0", "discounting_chain/3", "discounting_chain/9",
                                       "discounting_chain/17"])
def test_discounting_chain_parity(bsuite_id):
    # The first action picks the chain: cycle through all five so every chain pays once per 5 episodes.
    episodes = iter(range(10**6))

    def cycle(draws, t, rng):
        return next(episodes) % 5 if t == 0 else rng.integers(5)

    rewards = _assert_parity(bsuite_id, cycle, seed=4)
    returns = rewards.sum(1)
    bonus = int(sweep.SETTINGS[bsuite_id]["mapping_seed"]) % 5
    np.testing.assert_array_equal(returns, [np.float32(1.1) if e % 5 == bonus else 1.0
                                            for e in range(EPISODES)])
    _assert_parity(bsuite_id, _random(5), seed=5)


@pytest.mark.parametrize("bsuite_id", ["catch/0", "catch/7", "catch/19"])
def test_catch_parity(bsuite_id):
    seed = int(bsuite_id.split("/")[1])
    columns = jenvs.make(bsuite_id)[0].columns
    rewards = _assert_parity(bsuite_id, _random(3), seed=seed)
    assert set(rewards[:, -1]) == {-1.0, 1.0}
    # Walls: always left / always right clip the paddle at the edges.
    _assert_parity(bsuite_id, lambda d, t, r: 0, seed=seed + 100)
    _assert_parity(bsuite_id, lambda d, t, r: 2, seed=seed + 200)

    paddle = {"x": columns // 2}

    def track(draws, t, rng):  # move towards the ball's column: catches every ball on a 10 x 5 board
        if t == 0:
            paddle["x"] = columns // 2
        action = 1 + int(np.sign(int(draws["ball_column"]) - paddle["x"]))
        paddle["x"] = int(np.clip(paddle["x"] + action - 1, 0, columns - 1))
        return action

    assert (_assert_parity(bsuite_id, track, seed=seed + 300)[:, -1] == 1.0).all()


@pytest.mark.parametrize("experiment", jenvs.experiments())
def test_make_every_id_matches_bsuite_specs(experiment):
    for bsuite_id in sweep.SWEEP:
        if not bsuite_id.startswith(experiment + sweep.SEPARATOR):
            continue
        env, params = jenvs.make(bsuite_id)
        ref = _bsuite_env(bsuite_id, seed=0)
        assert env.observation_shape == ref.observation_spec().shape, bsuite_id
        assert env.num_actions == ref.action_spec().num_values, bsuite_id
        assert jenvs.make("bsuite/" + bsuite_id)[0] == env
        hash(env)  # static under jit


def test_make_errors_name_the_fix():
    with pytest.raises(ValueError, match="Supported experiments"):
        jenvs.make("deep_sea/0")
    with pytest.raises(ValueError, match="memory_len ids 0-22 are memory_length"):
        jenvs.make("memory_len/99")


def test_reset_draws_are_uniform():
    """Unforced draws follow bsuite's distributions: fair context bits, uniform query and column."""
    keys = jax.random.split(jax.random.PRNGKey(3), 4000)
    env, params = jenvs.make("memory_size/4")  # 5 bits
    states, _ = jax.jit(jax.vmap(env.reset, in_axes=(None, 0)))(params, keys)
    assert abs(float(states.context.mean()) - 0.5) < 0.02
    np.testing.assert_allclose(np.bincount(np.asarray(states.query), minlength=5) / 4000, 0.2, atol=0.025)
    env, params = jenvs.make("catch/0")
    states, _ = jax.jit(jax.vmap(env.reset, in_axes=(None, 0)))(params, keys)
    np.testing.assert_allclose(np.bincount(np.asarray(states.ball_x), minlength=5) / 4000, 0.2, atol=0.025)


@pytest.mark.parametrize("bsuite_id", ["memory_len/2", "catch/0", "discounting_chain/1"])
def test_auto_reset_steps_across_episodes(bsuite_id):
    """AutoReset: the step after an end is the wrapped env's reset with the step's second subkey."""
    env, params = jenvs.make(bsuite_id)
    auto = jenvs.AutoReset(env)
    steps = 3 * 101 + 7
    actions = jax.random.randint(jax.random.PRNGKey(1), (steps,), 0, env.num_actions)
    keys = jax.random.split(jax.random.PRNGKey(2), steps)

    @jax.jit
    def run(state):
        return jax.lax.scan(lambda s, x: auto.step(params, s, *x), state, (actions, keys))

    state0, first = auto.reset(params, jax.random.PRNGKey(0))
    _, ts = jax.device_get(run(state0))
    ended = ts.terminated | ts.truncated
    assert ended.sum() >= 3
    np.testing.assert_array_equal(ts.first[1:], ended[:-1])  # a reset exactly after each end
    assert not ts.first[0]
    episode_len = int(np.flatnonzero(ended)[0]) + 1
    starts = np.flatnonzero(ts.first)
    np.testing.assert_array_equal(np.diff(starts), episode_len + 1)  # each episode + its reset step
    reset = jax.jit(lambda key: env.reset(params, jax.random.split(key)[1])[1])
    for t in starts:
        expected = reset(keys[t])
        np.testing.assert_array_equal(ts.obs[t], expected.obs)
        assert ts.reward[t] == 0 and not ts.terminated[t]


def test_envs_jax_imports_nothing_from_worldmodels():
    code = "import sys, envs.jax; print([m for m in sys.modules if m.startswith('worldmodels')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
