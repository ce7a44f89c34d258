"""bsuite's MemoryChain (experiments `memory_len` and `memory_size`) as a functional JAX env.

Mirrors `bsuite.environments.memory_chain.MemoryChain` step for step:

* At reset the env draws a context of `num_bits` bits (each 0/1 with probability 1/2) and a query
  index in [0, num_bits).
* The observation, shape (1, num_bits + 2), is [time, query, 2 * context - 1] for the env's current
  time step t: time = 1 - t / memory_length on every step; the query only when
  t == memory_length - 1 (else 0); the context (as +-1) only when t == 0 (else 0).
* `step` returns the observation of the time step BEFORE it advances t (bsuite computes it first),
  so the first step repeats the reset observation, context included.
* Steps 1..memory_length give reward 0; step memory_length + 1 ends the episode (termination) with
  reward +1 if the action equals context[query], else -1. Episodes are memory_length + 1 steps.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from envs.jax.base import Action, TimeStep, restart, transition


class MemoryChainParams(NamedTuple):
    """One problem instance.

    - `memory_length`: int32 scalar, steps between the context and the decision.
    - `time_obs`: float32 [memory_length + 1], the time channel for each t, computed as bsuite does
      (float64 `1 - t / memory_length`, then float32). A table rather than a float32 division
      because XLA may rewrite division by a constant as a multiplication, which can differ from
      bsuite in the last bit.
    """

    memory_length: Int[Array, ""]
    time_obs: Float[Array, " memory_length_plus_1"]


class MemoryChainState(NamedTuple):
    """`timestep`: int32 t (0 at reset); `context`: int32 [num_bits] of 0/1; `query`: int32 index."""

    timestep: Int[Array, ""]
    context: Int[Array, " num_bits"]
    query: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class MemoryChain:
    """The memory chain with `num_bits` context bits (static: it fixes the observation shape).

    `memory_len/N` ids use num_bits 1; `memory_size/N` ids use memory_length 2.
    """

    num_bits: int = 1
    num_actions: int = 2

    @property
    def observation_shape(self) -> tuple[int, int]:
        return (1, self.num_bits + 2)

    def default_params(self, memory_length: int = 1) -> MemoryChainParams:
        """Params for a chain of `memory_length` >= 1 steps."""
        if memory_length < 1:
            raise ValueError(f"memory_length must be >= 1, got {memory_length}.")
        t = np.arange(memory_length + 1)
        time_obs = np.array([1 - ti / memory_length for ti in t], np.float64).astype(np.float32)
        return MemoryChainParams(jnp.asarray(memory_length, jnp.int32), jnp.asarray(time_obs))

    def _observation(self, params: MemoryChainParams, state: MemoryChainState) -> Float[Array, "1 n"]:
        t = state.timestep
        time = params.time_obs[t]
        query = jnp.where(t == params.memory_length - 1, state.query, 0).astype(jnp.float32)
        context = jnp.where(t == 0, 2 * state.context - 1, 0).astype(jnp.float32)
        return jnp.concatenate([time[None], query[None], context])[None]

    def reset(self, params: MemoryChainParams, key: PRNGKeyArray, *,
              context: Int[Array, " num_bits"] | None = None,
              query: Int[Array, ""] | None = None) -> tuple[MemoryChainState, TimeStep]:
        """Start an episode.

        **Arguments:**
        - `params`, `key`: the instance and the key for the draws.
        - `context`, `query`: force the draws instead (int arrays of shape [num_bits] with 0/1
          entries, and a scalar in [0, num_bits)), e.g. to replay a bsuite env's episode, whose
          draws are its `_context` and `_query` after `reset()`.

        **Returns:** (state, first `TimeStep`).
        """
        context_key, query_key = jax.random.split(key)
        if context is None:
            context = jax.random.bernoulli(context_key, 0.5, (self.num_bits,))
        if query is None:
            query = jax.random.randint(query_key, (), 0, self.num_bits)
        context = jnp.broadcast_to(jnp.asarray(context, jnp.int32), (self.num_bits,))
        state = MemoryChainState(jnp.zeros((), jnp.int32), context, jnp.asarray(query, jnp.int32))
        return state, restart(self._observation(params, state))

    def step(self, params: MemoryChainParams, state: MemoryChainState, action: Action,
             key: PRNGKeyArray | None = None) -> tuple[MemoryChainState, TimeStep]:
        """Take `action` (0 or 1); `key` is unused (the chain is deterministic after reset).

        Stepping after the terminal step is undefined: reset, or wrap the env in `AutoReset`.
        """
        del key
        obs = self._observation(params, state)  # before t advances, as in bsuite
        last = state.timestep == params.memory_length
        correct = jnp.asarray(action) == state.context[state.query]
        reward = jnp.where(last, jnp.where(correct, 1.0, -1.0), 0.0)
        return state._replace(timestep=state.timestep + 1), transition(obs, reward, last)
