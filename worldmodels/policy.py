"""Load a trained run and act with it: `worldmodels.load(run_dir)` -> `Policy`.

    policy = worldmodels.load("runs/default")          # the latest checkpoint
    env = gymnasium.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    policy.reset()
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
        if terminated or truncated:
            break

A `Policy` takes raw gymnasium observations (one env's, or a vector env's batch after
`reset(batch_size=N)`), keeps the recurrent state of the world model between calls, and returns
actions the env's `step` takes. `policy.agent_state` and `policy.world_model` are the restored
PyTrees for library use. Loading reads only arrays and JSON (`config.json`, `spaces.json`, the
checkpoint's orbax arrays and metadata): nothing from the run directory is unpickled, so a run dir
from someone else is safe to open. The arrays land on this machine's default device, whatever devices
wrote them (tests/test_sharding.py loads a run written on 2 devices in a 1-device process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import jax
import numpy as np

from worldmodels import agent as agent_lib
from worldmodels import spaces
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import Config, from_dict
from worldmodels.world_model import WorldModel

__all__ = ["Policy", "load", "load_config", "restore_agent"]


def load_config(run_dir: str | Path) -> Config:
    """The resolved config a run was trained with (its `config.json`)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); pass the --run.logdir "
                                "of a training run")
    return from_dict(json.loads(path.read_text()))


def load_spaces(run_dir: str | Path) -> tuple[gym.Space, gym.Space]:
    """The (observation, action) spaces of a run's env, from its `spaces.json`."""
    path = Path(run_dir) / "spaces.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no spaces.json (runs from before it was written): pass the env's "
                                "spaces, e.g. load(run_dir, observation_space=env.single_observation_space, "
                                "action_space=env.single_action_space) for a vector env")
    saved = json.loads(path.read_text())
    return spaces.env_spaces_from_dict(saved)


def restore_agent(run_dir: str | Path, config: Config, observation_space: gym.Space, action_space: gym.Space,
                  step: int | None = None) -> tuple[agent_lib.AgentState, int, dict]:
    """The agent state of a host-loop run's checkpoint (the latest if `step` is None).

    **Returns:** (agent state, checkpoint step, the loop's counters at that step).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoints/ (the run saves one every "
                                "run.checkpoint_every steps and when it ends)")
    rc = config.run
    state = agent_lib.init(config.agent, spaces.obs_spec(observation_space), spaces.action_spec(action_space),
                           jax.random.PRNGKey(rc.seed))
    # The loop saves the agent with its acting carry and key; they shape the restore target.
    template = {"agent": state, "carry": agent_lib.initial_carry(state, rc.num_envs),
                "key": jax.random.PRNGKey(rc.seed + 1)}
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no finished checkpoint yet")
        if ckpt.read_meta(step).get("loop") == "device":
            raise ValueError(f"{run_dir} is a device-loop run (--device-loop): its checkpoints hold the whole "
                             "loop carry, which only the device loop restores. Use --run.eval-every when "
                             "training it: the device loop then logs greedy evaluation episodes to scores.jsonl")
        restored, _, meta, _ = ckpt.restore(template, None, step)
    return restored["agent"], step, meta["counters"]


class Policy:
    """A trained agent acting on raw gymnasium observations, its recurrent state carried inside.

    **Attributes:** `agent_state` (`AgentState`: world model, actor, critic, optimiser state),
    `world_model`, `config`, `step` (the checkpoint's env step), `observation_space` and
    `action_space` (one env's).
    """

    def __init__(self, agent_state: agent_lib.AgentState, config: Config, observation_space: gym.Space,
                 action_space: gym.Space, step: int, seed: int = 0):
        self.agent_state, self.config, self.step = agent_state, config, step
        self.observation_space, self.action_space = observation_space, action_space
        self._key = jax.random.PRNGKey(seed)
        self.reset()

    @property
    def world_model(self) -> WorldModel:
        return self.agent_state.world_model

    @property
    def latent(self):
        """The world model's recurrent state after the last `act` (a PyTree, `[N, ...]` leaves)."""
        return self._carry.latent

    @property
    def features(self) -> np.ndarray:
        """What the actor read at the last `act`: `world_model.dynamics.policy_features(latent)`, `[N, F]`
        (e.g. to probe what the state remembers)."""
        return np.asarray(self.world_model.dynamics.policy_features(self._carry.latent))

    def reset(self, batch_size: int = 1) -> None:
        """Start new episodes in `batch_size` envs: the next `act` takes `batch_size` observations
        (with `batch_size` 1, one env's unbatched observation) and starts from a fresh latent."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._carry = agent_lib.initial_carry(self.agent_state, batch_size)
        self._first = np.ones(batch_size, bool)

    def _batched(self, obs: Any) -> bool:
        """Whether `obs` has a leading batch axis (a vector env's) or is one env's observation."""
        space = self.observation_space
        if isinstance(space, gym.spaces.Dict):
            key = next(iter(space.spaces))
            leaf, leaf_space = obs[key], space.spaces[key]
        else:
            leaf, leaf_space = obs, space
        return np.ndim(leaf) > len(leaf_space.shape or ())

    def act(self, obs: Any, greedy: bool = True, first: Any = None, key: jax.Array | None = None) -> np.ndarray:
        """The actions for `obs` and the step of the recurrent state.

        **Arguments:** `obs`: one env's observation (after `reset()`) or a vector env's batch `[N, ...]`
        (after `reset(N)`); `greedy`: the policy's mode (else a sample); `first`: `[N]` bools, True
        where the observation starts a new episode (a vector env's autoreset; the first `act` after
        `reset` always starts one); `key`: the sampling key (default: the policy's own, split each call).

        **Returns:** the action as the env's `step` takes it: one env's action, or `[N]`/`[N, A]` for a batch.
        """
        batched = self._batched(obs)
        if not batched and self.batch_size != 1:
            raise ValueError(f"act got one env's observation, but reset(batch_size={self.batch_size}) asked for "
                             f"{self.batch_size}: pass the vector env's batch, or call reset() for one env")
        n = self.batch_size
        batch = spaces.batch_obs(self.observation_space, obs if batched else _add_batch_axis(obs), n)
        is_first = self._first if first is None else (self._first | np.asarray(first, bool).reshape(n))
        if key is None:
            self._key, key = jax.random.split(self._key)
        action, self._carry = agent_lib.policy(self.agent_state, self._carry, {**batch, "is_first": is_first},
                                               key, greedy)
        self._first = np.zeros(n, bool)
        actions = spaces.env_actions(self.action_space, np.asarray(action))
        return actions if batched else actions[0]


def _add_batch_axis(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: np.asarray(v)[None] for k, v in obs.items()}
    return np.asarray(obs)[None]


def load(run_dir: str | Path, step: int | None = None, *, observation_space: gym.Space | None = None,
         action_space: gym.Space | None = None, seed: int = 0) -> Policy:
    """A `Policy` from a host-loop training run's checkpoint (the latest, or `step`).

    **Arguments:** `run_dir`: a training run's `--run.logdir`; `observation_space`/`action_space`:
    one env's spaces, for runs without `spaces.json`; `seed`: the key for sampled actions.

    Reads arrays and JSON only; unpickles nothing.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    if observation_space is None or action_space is None:
        saved_obs, saved_act = load_spaces(run_dir)
        observation_space = observation_space or saved_obs
        action_space = action_space or saved_act
    state, step, _ = restore_agent(run_dir, config, observation_space, action_space, step)
    return Policy(state, config, observation_space, action_space, step, seed)
