"""bsuite's Catch (experiment `catch`) as a functional JAX env.

Mirrors `bsuite.environments.catch.Catch`:

* A board of `rows` x `columns` (10 x 5 in bsuite); the observation is the board as float32, 1.0
  at the ball and at the paddle, 0 elsewhere.
* Reset: the ball starts in row 0 of a uniformly drawn column; the paddle in the bottom row, at
  column `columns // 2`.
* Actions 0, 1, 2 move the paddle by -1, 0, +1 (clipped to the board); then the ball drops one row.
  When the ball reaches the bottom row the episode ends (termination) with reward +1 if the paddle
  is under it, else -1; other steps give 0. Episodes are `rows - 1` steps.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from envs.jax.base import Action, TimeStep, restart, transition

_MOVES = (-1, 0, 1)  # left, stay, right, as bsuite's _ACTIONS


class CatchParams(NamedTuple):
    """Catch has no instance parameters: the board size is static (it fixes the observation shape)."""


class CatchState(NamedTuple):
    """int32 scalars: the ball's column and row, the paddle's column (its row is always rows - 1)."""

    ball_x: Int[Array, ""]
    ball_y: Int[Array, ""]
    paddle_x: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class Catch:
    """Catch on a `rows` x `columns` board (bsuite: 10 x 5)."""

    rows: int = 10
    columns: int = 5
    num_actions: int = len(_MOVES)

    def __post_init__(self) -> None:
        if self.rows < 2 or self.columns < 1:
            raise ValueError(f"Catch needs rows >= 2 and columns >= 1, got {self.rows} x {self.columns}.")

    @property
    def observation_shape(self) -> tuple[int, int]:
        return (self.rows, self.columns)

    def default_params(self) -> CatchParams:
        return CatchParams()

    def _observation(self, state: CatchState) -> Float[Array, "rows columns"]:
        board = jnp.zeros(self.observation_shape, jnp.float32)
        board = board.at[state.ball_y, state.ball_x].set(1.0)
        return board.at[self.rows - 1, state.paddle_x].set(1.0)

    def reset(self, params: CatchParams, key: PRNGKeyArray, *,
              ball_column: Int[Array, ""] | None = None) -> tuple[CatchState, TimeStep]:
        """Start an episode.

        **Arguments:**
        - `params`, `key`: the (empty) instance and the key for the ball's column.
        - `ball_column`: force the draw instead (an int in [0, columns)), e.g. to replay a bsuite
          env's episode, whose draw is its `_ball_x` after `reset()`.

        **Returns:** (state, first `TimeStep`).
        """
        del params
        if ball_column is None:
            ball_column = jax.random.randint(key, (), 0, self.columns)
        state = CatchState(jnp.asarray(ball_column, jnp.int32), jnp.zeros((), jnp.int32),
                           jnp.full((), self.columns // 2, jnp.int32))
        return state, restart(self._observation(state))

    def step(self, params: CatchParams, state: CatchState, action: Action,
             key: PRNGKeyArray | None = None) -> tuple[CatchState, TimeStep]:
        """Take `action` in {0, 1, 2}; `key` is unused. Stepping after the terminal step is undefined."""
        del params, key
        move = jnp.asarray(_MOVES)[jnp.asarray(action)]
        paddle_x = jnp.clip(state.paddle_x + move, 0, self.columns - 1)
        ball_y = state.ball_y + 1
        last = ball_y == self.rows - 1
        reward = jnp.where(last, jnp.where(paddle_x == state.ball_x, 1.0, -1.0), 0.0)
        state = CatchState(state.ball_x, ball_y, paddle_x)
        return state, transition(self._observation(state), reward, last)
