"""gymnasium spaces <-> the agent's observation dict and action vectors."""

from __future__ import annotations

from typing import Any, Mapping

import gymnasium as gym
import numpy as np

from worldmodels.agent import ActionSpec

SUPPORTED = "Box (vectors of any shape, or uint8 [H, W, C] images), Discrete, MultiBinary, or a Dict of those"


def _leaf_spec(name: str, space: gym.Space) -> tuple[tuple[int, ...], str]:
    if isinstance(space, gym.spaces.Box):
        if len(space.shape) == 3 and space.dtype == np.uint8:
            h, w, _ = space.shape
            if h != w or h < 8 or h & (h - 1):  # the CNN halves a square side down to 4x4
                raise TypeError(f"image observation {name!r} is {h}x{w}: the CNN needs a square side that is a "
                                "power of two >= 8 (e.g. 64x64); resize it with "
                                "gymnasium.wrappers.ResizeObservation(env, (64, 64))")
            return tuple(space.shape), "uint8"
        return (int(np.prod(space.shape)),), "float32"
    if isinstance(space, gym.spaces.Discrete):
        return (int(space.n),), "float32"
    if isinstance(space, gym.spaces.MultiBinary):
        return (int(np.prod(space.shape)),), "float32"
    raise TypeError(f"unsupported observation space {space!r} for key {name!r}; supported: {SUPPORTED}. "
                    "Wrap the env with a gymnasium ObservationWrapper that maps it to one of these.")


def obs_spec(space: gym.Space) -> dict[str, tuple[tuple[int, ...], str]]:
    """The agent's observation spec (key -> (shape, dtype)) for a single env's observation space.

    A Dict space keeps its keys; any other space becomes `image` (uint8 HxWxC) or `vector`.
    """
    if isinstance(space, gym.spaces.Dict):
        return {k: _leaf_spec(k, s) for k, s in space.spaces.items()}
    spec = _leaf_spec("observation", space)
    return {("image" if len(spec[0]) == 3 else "vector"): spec}


def _convert(space: gym.Space, value: Any, batch: int) -> np.ndarray:
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8:
        return np.asarray(value, np.uint8)
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[np.asarray(value, np.int64).reshape(batch) - space.start]
    return np.asarray(value, np.float32).reshape(batch, -1)


def batch_obs(space: gym.Space, obs: Any, batch: int) -> dict[str, np.ndarray]:
    """A vector env's batched observation -> the agent's dict of `[batch, ...]` arrays."""
    if isinstance(space, gym.spaces.Dict):
        return {k: _convert(s, obs[k], batch) for k, s in space.spaces.items()}
    (key,) = obs_spec(space)
    return {key: _convert(space, obs, batch)}


def action_spec(space: gym.Space) -> ActionSpec:
    if isinstance(space, gym.spaces.Discrete):
        return ActionSpec(int(space.n), True)
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise TypeError(f"continuous action space {space!r} needs finite bounds (the actor outputs [-1, 1])")
        return ActionSpec(int(space.shape[0]), False)
    raise TypeError(f"unsupported action space {space!r}; supported: Discrete, or a 1-D Box with finite bounds")


def env_actions(space: gym.Space, actions: np.ndarray) -> np.ndarray:
    """Agent actions `[N, A]` (one-hot, or in [-1, 1]) -> what the vector env's `step` takes."""
    actions = np.asarray(actions)
    if isinstance(space, gym.spaces.Discrete):
        return actions.argmax(-1).astype(np.int64) + space.start
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    return (low + (actions + 1.0) * 0.5 * (high - low)).astype(space.dtype)


def step_spec(space: gym.Space, action: ActionSpec) -> Mapping[str, tuple[tuple[int, ...], str]]:
    """Everything one stored step holds: observations, the action into the step, reward and flags."""
    return {**obs_spec(space), "action": ((action.dim,), "float32"), "reward": ((), "float32"),
            "is_first": ((), "bool"), "is_last": ((), "bool"), "is_terminal": ((), "bool")}


def output_problem(space: gym.Space, obs: Any, reward: Any, num_envs: int) -> tuple[int, str, str] | None:
    """What is wrong with a vector env's step output, if anything: (env index, key, what), for an
    observation of the wrong shape or with NaN/inf values, or a NaN/inf reward. None if it is fine.

    **Arguments:** `obs` batched like the vector env's observation (`[num_envs, ...]` per key),
    `reward` `[num_envs]`; `space` is a single env's observation space.
    """
    leaves = space.spaces.items() if isinstance(space, gym.spaces.Dict) else [("observation", space)]
    for key, leaf in leaves:
        value = np.asarray(obs[key] if isinstance(space, gym.spaces.Dict) else obs)
        expected = (num_envs, *leaf.shape) if leaf.shape else (num_envs,)
        if value.shape != expected:
            return 0, key, f"shape {value.shape[1:]} instead of the space's {tuple(leaf.shape)}"
        if np.issubdtype(value.dtype, np.floating):
            bad = ~np.isfinite(value.reshape(num_envs, -1)).all(axis=1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                return i, key, f"non-finite values ({value[i].ravel()[~np.isfinite(value[i].ravel())][0]})"
    rewards = np.asarray(reward, np.float64).reshape(-1)
    if not np.isfinite(rewards).all():
        i = int(np.flatnonzero(~np.isfinite(rewards))[0])
        return i, "reward", f"a non-finite reward ({rewards[i]})"
    return None


def _bound(x: np.ndarray) -> Any:
    """A Box bound as JSON: one number when every element is the same, else nested lists (inf kept)."""
    flat = np.unique(x)
    return flat[0].item() if flat.size == 1 else x.tolist()


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """A JSON-ready description of an observation or action space (the kinds this package takes), so
    that a run directory says what its agent reads and writes without making its env (`worldmodels.load`)."""
    if isinstance(space, gym.spaces.Dict):
        return {"kind": "Dict", "spaces": {k: space_to_dict(s) for k, s in space.spaces.items()}}
    if isinstance(space, gym.spaces.Box):
        return {"kind": "Box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": _bound(space.low), "high": _bound(space.high)}
    if isinstance(space, gym.spaces.Discrete):
        return {"kind": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"kind": "MultiBinary", "n": [int(n) for n in np.atleast_1d(space.n)]}
    raise TypeError(f"unsupported space {space!r}; supported: {SUPPORTED}")


def space_from_dict(d: Mapping[str, Any]) -> gym.Space:
    """The inverse of `space_to_dict`."""
    kind = d["kind"]
    if kind == "Dict":
        return gym.spaces.Dict({k: space_from_dict(s) for k, s in d["spaces"].items()})
    if kind == "Box":
        dtype, shape = np.dtype(d["dtype"]), tuple(d["shape"])
        bound = lambda b: np.broadcast_to(np.asarray(b, np.float64), shape).astype(dtype)
        return gym.spaces.Box(bound(d["low"]), bound(d["high"]), shape, dtype)
    if kind == "Discrete":
        return gym.spaces.Discrete(d["n"], start=d["start"])
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(d["n"] if len(d["n"]) > 1 else d["n"][0])
    raise ValueError(f"unknown space kind {kind!r} in a space description")


def env_spaces_to_dict(observation: gym.Space, action: gym.Space) -> dict[str, Any]:
    """One env's spaces as JSON-ready `{"observation": ..., "action": ...}` (what `spaces.json` holds)."""
    return {"observation": space_to_dict(observation), "action": space_to_dict(action)}


def env_spaces_from_dict(d: Mapping[str, Any]) -> tuple[gym.Space, gym.Space]:
    """The inverse of `env_spaces_to_dict`: (observation space, action space)."""
    return space_from_dict(d["observation"]), space_from_dict(d["action"])
