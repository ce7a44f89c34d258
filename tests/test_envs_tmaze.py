"""The Passive T-Maze (envs.jax.tmaze) against what it promises: a policy that knows the cue gets the
maximum return, one that ignores it scores chance, episodes last L + 1 steps with the only reward
at the end, the variable version draws every length it lists, and the gymnasium env (envs.make)
gives the JAX env's observations and rewards for the same actions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
import envs.jax as jenvs
from envs.jax.tmaze import PassiveTMaze

EPISODES = 2000


def rollouts(task, policy, episodes=EPISODES, seed=0):
    """Whole episodes of `task` under `policy(first_obs, obs) -> action`, batched: (rewards [N, S],
    terminated [N, S], lengths [N]) over S = the longest episode + 1 steps."""
    env, params = jenvs.make(task)
    steps = int(params.lengths.max()) + 2

    def episode(key):
        state, first = env.reset(params, key)

        def body(carry, _):
            state, ts, done = carry
            action = policy(first.obs, ts.obs)
            state, ts = env.step(params, state, action)
            reward = jnp.where(done, 0.0, ts.reward)
            terminated = ts.terminated & ~done
            return (state, ts, done | ts.terminated), (reward, terminated)

        _, (reward, terminated) = jax.lax.scan(body, (state, first, jnp.zeros((), bool)), None, steps)
        return reward, terminated, state.length

    return jax.device_get(jax.jit(jax.vmap(episode))(jax.random.split(jax.random.PRNGKey(seed), episodes)))


def oracle(first_obs, obs):
    return jnp.where(first_obs[0] > 0, 0, 1)  # up when the cue said up


def always_up(first_obs, obs):
    return jnp.zeros((), jnp.int32)


@pytest.mark.parametrize("task, lengths", [("tmaze/24", [24]), ("tmaze/3-6", [3, 4, 5, 6])])
def test_the_cue_gives_the_maximum_and_ignoring_it_chance(task, lengths):
    rewards, terminated, drawn = rollouts(task, oracle)
    assert (rewards.sum(1) == 1.0).all()  # the maximum, every episode
    assert sorted(set(drawn.tolist())) == lengths  # every listed length drawn
    # Episodes last L + 1 steps: the terminal step is step L + 1, and the only reward is there.
    end = terminated.argmax(1) + 1
    np.testing.assert_array_equal(end, drawn + 1)
    assert terminated.sum(1).tolist() == [1] * EPISODES
    np.testing.assert_array_equal(rewards[np.arange(EPISODES), end - 1], 1.0)
    assert np.count_nonzero(rewards) == EPISODES
    # A policy that ignores the cue: a fair coin's worth (within 4 standard errors).
    ignored, _, _ = rollouts(task, always_up, seed=1)
    returns = ignored.sum(1)
    assert set(returns.tolist()) == {-1.0, 1.0}
    assert abs(returns.mean()) < 4 / np.sqrt(EPISODES)


def test_the_cue_is_in_the_first_observation_only():
    env, params = jenvs.make("tmaze/5")
    for cue, sign in ((0, 1.0), (1, -1.0)):
        state, ts = env.reset(params, jax.random.PRNGKey(0), cue=cue)
        observations = [np.asarray(ts.obs)]
        for _ in range(5):
            state, ts = env.step(params, state, 0)
            observations.append(np.asarray(ts.obs))
        obs = np.stack(observations)
        np.testing.assert_array_equal(obs[:, 0], [sign, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(obs[:, 1], [0, 0, 0, 0, 0, 1])  # the junction at cell 5
        np.testing.assert_allclose(obs[:, 2], np.arange(6) / 5)
    assert PassiveTMaze.correlation_horizons(params) == [6]
    assert PassiveTMaze.correlation_horizons(jenvs.make("tmaze/3-6")[1]) == [4, 5, 6, 7]


@pytest.mark.parametrize("task", ["tmaze/7", "tmaze/2-9"])
def test_gymnasium_env_equals_the_jax_env(task):
    gym_env = envs.make(task, seed=3)
    env, params = jenvs.make(task)
    rng = np.random.default_rng(0)
    for episode in range(6):
        obs, _ = gym_env.reset()
        observations, rewards, actions, done = [obs], [], [], False
        while not done:
            action = int(rng.integers(2))
            obs, reward, terminated, truncated, _ = gym_env.step(action)
            observations.append(obs), rewards.append(reward), actions.append(action)
            done = terminated or truncated
        assert terminated and not truncated
        # The same episode in the JAX env, with the gym episode's cue and length forced.
        cue = 0 if observations[0][0] > 0 else 1
        state, ts = env.reset(params, jax.random.PRNGKey(episode), cue=cue, length=len(actions) - 1)
        jax_obs, jax_rewards = [np.asarray(ts.obs)], []
        for action in actions:
            state, ts = env.step(params, state, action)
            jax_obs.append(np.asarray(ts.obs)), jax_rewards.append(float(ts.reward))
        np.testing.assert_array_equal(np.stack(observations), np.stack(jax_obs))
        assert rewards == jax_rewards
    assert gym_env.observation_space.shape == (3,) and gym_env.action_space.n == 2


def test_bad_ids_are_named():
    for bad in ("tmaze/0", "tmaze/x", "tmaze/9-3"):
        with pytest.raises(ValueError, match="unknown T-Maze id"):
            envs.make(bad)
