"""POPGym (Morad et al. 2023) tasks: ``popgym/<Env>`` -> gymnasium id ``popgym-<Env>-v0``.

``<Env>`` is a POPGym class name with its difficulty, e.g. ``RepeatPreviousEasy``,
``CountRecallHard`` (`POPGYM_ENVS`). Episodes have fixed lengths set by the game and end with
``terminated=True``, as POPGym defines them.

With ``flatten=True`` (default) the spaces are made ones the agent reads: ``Tuple`` and
``MultiDiscrete`` observations become one concatenated one-hot vector
(``gymnasium.spaces.utils.flatten``), and ``MultiDiscrete`` actions one ``Discrete`` over all
combinations (as POPGym's own ``DiscreteAction`` wrapper does). ``Discrete`` and ``Box`` spaces are
left as they are.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["POPGYM_ENVS", "make_popgym"]

# POPGym 1.0.7's registered games x difficulties, spelled out so the names can be registered
# with gymnasium without importing popgym (a test checks it against the installed package).
_GAMES = (
    "Autoencode", "RepeatPrevious", "RepeatFirst", "CountRecall", "PositionOnlyCartPole",
    "PositionOnlyPendulum", "VelocityOnlyCartpole", "NoisyPositionOnlyCartPole",
    "NoisyPositionOnlyPendulum", "MultiarmedBandit", "HigherLower", "Battleship",
    "Concentration", "MineSweeper",
)
POPGYM_ENVS: tuple[str, ...] = tuple(
    f"{game}{level}" for level in ("Easy", "Medium", "Hard") for game in _GAMES
)


class _FlattenObservation(gymnasium.ObservationWrapper):
    """Tuple / MultiDiscrete observation -> float32 concatenated one-hot vector."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        flat = spaces.utils.flatten_space(env.observation_space)
        self.observation_space = spaces.Box(flat.low, flat.high, flat.shape, dtype=np.float32)

    def observation(self, observation: Any) -> np.ndarray:
        return spaces.utils.flatten(self.env.observation_space, observation).astype(np.float32)


class _RavelActions(gymnasium.ActionWrapper):
    """One ``Discrete(prod(nvec))`` action -> the ``MultiDiscrete(nvec)`` action it indexes.

    The same mapping as POPGym's ``DiscreteAction``, which only wraps unwrapped POPGym envs.
    """

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        self._nvec = tuple(int(n) for n in env.action_space.nvec)
        self.action_space = spaces.Discrete(int(np.prod(self._nvec)))

    def action(self, action: Any) -> np.ndarray:
        return np.asarray(np.unravel_index(int(action), self._nvec), dtype=np.int64)


def make_popgym(env_id: str, seed: int | None, *, flatten: bool = True) -> gymnasium.Env:
    """Build ``popgym/<env_id>``.

    Args:
      env_id: e.g. ``'RepeatPreviousEasy'`` (one of `POPGYM_ENVS`).
      seed: applied at the first ``reset()`` that is given no seed (gymnasium seeds by reset).
      flatten: make Tuple/MultiDiscrete spaces agent-readable (see the module docstring).

    Returns:
      The gymnasium env.

    Raises:
      ValueError: unknown env id (lists the valid ones).
    """
    import popgym  # noqa: F401  (registers the popgym-* ids with gymnasium)

    from envs import _SeedFirstReset

    gym_id = f"popgym-{env_id}-v0"
    if gym_id not in gymnasium.registry:
        valid = sorted(k[len("popgym-"):-len("-v0")] for k in gymnasium.registry
                       if k.startswith("popgym-"))
        raise ValueError(f"Unknown POPGym env {env_id!r}. Valid ids: {valid}.")
    env: gymnasium.Env = gymnasium.make(gym_id)
    if flatten:
        if isinstance(env.action_space, spaces.MultiDiscrete):
            env = _RavelActions(env)
        if isinstance(env.observation_space, (spaces.Tuple, spaces.MultiDiscrete)):
            env = _FlattenObservation(env)
    if seed is not None:
        env.action_space.seed(seed)
        env = _SeedFirstReset(env, seed)
    return env
