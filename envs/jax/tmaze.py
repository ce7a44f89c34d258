"""The Passive T-Maze, a memory task whose correlation horizon is set by one number, as a JAX env.

The agent starts at the foot of a corridor of `L` cells; the cue (up or down) is in the first
observation only. Whatever it does, each of its first `L` actions moves it one cell along the
corridor (passive: no exploration is needed), and at the junction (cell `L`) its action chooses:
`+1` if it matches the cue, `-1` otherwise, and the episode ends. So every episode lasts `L + 1`
steps, the only reward is the last one, and the step that earns it is `L + 1` steps after the
step that showed the cue: the correlation horizon is xi = L + 1.

With several corridor lengths (`lengths`), each episode draws its own uniformly: the variable
horizon of Cherepanov et al. (2024), whose xi set is {L + 1 for L in lengths}. A model that
holds only the short ones can still score well on average, which is how a variable horizon hides a
long-term failure; score each length apart (the `length` of `TMazeState`, also the episode length
minus one).

Observation (float32 [3]): [cue (+1 up / -1 down at step 0, else 0), 1 at the junction (else 0),
the cell's fraction of the corridor t / L]. Actions: 0 up, 1 down (ignored in the corridor).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from envs.jax.base import Action, TimeStep, restart, transition


class TMazeParams(NamedTuple):
    """`lengths`: int32 [n], the corridor lengths an episode draws from (uniformly)."""

    lengths: Int[Array, " n"]


class TMazeState(NamedTuple):
    """`cell`: int32, 0 at the start, `length` at the junction; `cue`: int32, 0 up, 1 down."""

    cell: Int[Array, ""]
    length: Int[Array, ""]
    cue: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class PassiveTMaze:
    num_actions: int = 2
    observation_shape: tuple[int, ...] = (3,)

    def default_params(self, *lengths: int) -> TMazeParams:
        """Params for corridors of the given lengths (each >= 1; one length: a fixed horizon)."""
        lengths = lengths or (8,)
        if any(int(n) < 1 for n in lengths):
            raise ValueError(f"T-Maze corridor lengths must be >= 1, got {list(lengths)}")
        return TMazeParams(jnp.asarray(lengths, jnp.int32))

    @staticmethod
    def correlation_horizons(params: TMazeParams) -> list[int]:
        """xi of each corridor length: the rewarded step comes L + 1 steps after the cue."""
        return sorted({int(n) + 1 for n in jax.device_get(params.lengths)})

    def _observation(self, state: TMazeState) -> Float[Array, " 3"]:
        cue = jnp.where(state.cell == 0, 1.0 - 2.0 * state.cue, 0.0)
        junction = (state.cell == state.length).astype(jnp.float32)
        progress = jnp.minimum(state.cell, state.length) / state.length
        return jnp.stack([cue, junction, progress]).astype(jnp.float32)

    def reset(self, params: TMazeParams, key: PRNGKeyArray, *, cue: Int[Array, ""] | int | None = None,
              length: Int[Array, ""] | int | None = None) -> tuple[TMazeState, TimeStep]:
        """Start an episode: draw the cue and the corridor length (or take the forced ones)."""
        cue_key, length_key = jax.random.split(key)
        if cue is None:
            cue = jax.random.bernoulli(cue_key, 0.5)
        if length is None:
            length = params.lengths[jax.random.randint(length_key, (), 0, params.lengths.shape[0])]
        state = TMazeState(jnp.zeros((), jnp.int32), jnp.asarray(length, jnp.int32), jnp.asarray(cue, jnp.int32))
        return state, restart(self._observation(state))

    def step(self, params: TMazeParams, state: TMazeState, action: Action,
             key: PRNGKeyArray | None = None) -> tuple[TMazeState, TimeStep]:
        """Move along the corridor, or choose at the junction (which ends the episode)."""
        del params, key
        at_junction = state.cell == state.length
        reward = jnp.where(at_junction, jnp.where(jnp.asarray(action) == state.cue, 1.0, -1.0), 0.0)
        state = state._replace(cell=state.cell + 1)
        return state, transition(self._observation(state), reward, at_junction)


def make_tmaze(task_id: str) -> tuple[PassiveTMaze, TMazeParams]:
    """``tmaze/<L>`` (one corridor length) or ``tmaze/<L1>-<L2>`` (each episode draws L in L1..L2)."""
    low, _, high = task_id.partition("-")
    if not low.isdigit() or (high and not high.isdigit()) or int(low) < 1 or (high and int(high) < int(low)):
        raise ValueError(f"unknown T-Maze id {task_id!r}: use tmaze/<L> (a corridor of L >= 1 cells, xi = L + 1), "
                         "or tmaze/<L1>-<L2> with 1 <= L1 <= L2 (each episode draws its length), e.g. tmaze/24")
    lengths = range(int(low), int(high or low) + 1)
    env = PassiveTMaze()
    return env, env.default_params(*lengths)
