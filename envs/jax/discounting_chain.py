"""bsuite's DiscountingChain (experiment `discounting_chain`) as a functional JAX env.

Mirrors `bsuite.environments.discounting_chain.DiscountingChain`:

* 5 actions; the action taken on the first step picks a chain ("context") for the whole episode;
  later actions do nothing.
* Chain c pays its reward once, on step `REWARD_TIMESTEPS[c]` = (1, 3, 10, 30, 100)[c]: 1.0, or 1.1
  for the chain `mapping_seed % 5` (the problem instance: `discounting_chain/N` has mapping_seed N).
* The observation, shape (1, 2), is [context, t / 100]: context is -1 before the first action, then
  the chosen chain; t counts the steps taken.
* Every episode is 100 steps and ends by termination, so its return is 1.0 or 1.1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from envs.jax.base import Action, TimeStep, restart, transition

EPISODE_LEN = 100
REWARD_TIMESTEPS = (1, 3, 10, 30, 100)
# The time channel as bsuite computes it (float64 t / 100, then float32); a float32 division under
# XLA can differ in the last bit (division by a constant becomes a multiplication).
_TIME_OBS = np.array([t / EPISODE_LEN for t in range(EPISODE_LEN + 1)], np.float64).astype(np.float32)


class DiscountingChainParams(NamedTuple):
    """`rewards`: float32 [5], the reward of each chain (1.0, and 1.1 for the bonus chain)."""

    rewards: Float[Array, " 5"]


class DiscountingChainState(NamedTuple):
    """`timestep`: int32 steps taken; `context`: int32 chosen chain (-1 before the first step)."""

    timestep: Int[Array, ""]
    context: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class DiscountingChain:
    """The discounting chain; the instance (which chain has the bonus) lives in the params."""

    num_actions: int = len(REWARD_TIMESTEPS)
    observation_shape: tuple[int, int] = (1, 2)

    def default_params(self, mapping_seed: int = 0) -> DiscountingChainParams:
        """Params for bsuite's `mapping_seed` (chain `mapping_seed % 5` pays 1.1).

        bsuite draws the bonus chain at random when mapping_seed is None; here it must be given.
        """
        rewards = np.ones(len(REWARD_TIMESTEPS))  # float64, then += 0.1, as bsuite computes it
        rewards[int(mapping_seed) % len(REWARD_TIMESTEPS)] += 0.1
        return DiscountingChainParams(jnp.asarray(rewards.astype(np.float32)))

    def _observation(self, state: DiscountingChainState) -> Float[Array, "1 2"]:
        time = jnp.asarray(_TIME_OBS)[state.timestep]
        return jnp.stack([state.context.astype(jnp.float32), time])[None]

    def reset(self, params: DiscountingChainParams,
              key: PRNGKeyArray | None = None) -> tuple[DiscountingChainState, TimeStep]:
        """Start an episode (deterministic: `key` is unused). **Returns:** (state, first `TimeStep`)."""
        del params, key
        state = DiscountingChainState(jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32))
        return state, restart(self._observation(state))

    def step(self, params: DiscountingChainParams, state: DiscountingChainState, action: Action,
             key: PRNGKeyArray | None = None) -> tuple[DiscountingChainState, TimeStep]:
        """Take `action` in [0, 5); `key` is unused. Stepping after the terminal step is undefined."""
        del key
        context = jnp.where(state.timestep == 0, jnp.asarray(action, jnp.int32), state.context)
        timestep = state.timestep + 1
        pays = timestep == jnp.asarray(REWARD_TIMESTEPS)[context]
        reward = jnp.where(pays, params.rewards[context], 0.0)
        state = DiscountingChainState(timestep, context)
        return state, transition(self._observation(state), reward, timestep == EPISODE_LEN)
