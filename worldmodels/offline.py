"""World models without an agent: recorded episodes in, a trained world model out.

Episodes are `.npz` files (one per episode, `numpy.savez_compressed`) with the replay's step keys,
each `[T, ...]`: the observation keys (uint8 `[H, W, C]` images, float32 vectors), `action` (the
action *into* each step: zeros at the first; one-hot for discrete actions), `reward`, `is_first`,
`is_last`, `is_terminal`. The host loop writes them with `--run.save-episodes`; a directory of them
also holds `spaces.json` (`worldmodels.spaces.env_spaces_to_dict` of one env's observation and action
spaces), which says what the world model reads. `python -m experiments.train_world_model` trains
on them; `--agent.init-world-model RUN` starts an agent from the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from worldmodels import agent as agent_lib
from worldmodels import spaces
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import Config, ConfigError, from_dict, to_dict
from worldmodels.dists import symlog
from worldmodels.optim import make_optimizer
from worldmodels.world_model import WorldModel, WorldModelConfig

STEP_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal")


# -- data -------------------------------------------------------------------------------------------


def save_episode(path: Path, steps: Mapping[str, np.ndarray]) -> None:
    """One episode's steps (each `[T, ...]`) as a compressed `.npz`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **steps)
    tmp.replace(path)  # a reader never sees half a file


def load_episodes(directory: str | Path) -> tuple[list[dict[str, np.ndarray]], Any, Any]:
    """The episodes of a directory (sorted by file name) and its (observation, action) spaces."""
    directory = Path(directory)
    spec_path = directory / "spaces.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{directory} has no spaces.json: a directory of episodes says what they hold with "
                                "{'observation': ..., 'action': ...} as written by "
                                "worldmodels.spaces.env_spaces_to_dict (--run.save-episodes writes it)")
    saved = json.loads(spec_path.read_text())
    obs_space, act_space = spaces.env_spaces_from_dict(saved)
    files = sorted(p for p in directory.glob("*.npz") if not p.name.endswith(".tmp.npz"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no episodes (*.npz)")
    keys = set(spaces.step_spec(obs_space, spaces.action_spec(act_space)))
    episodes = []
    for f in files:
        with np.load(f, allow_pickle=False) as data:  # arrays only: no code from the files runs
            episode = {k: data[k] for k in data.files}
        missing = keys - set(episode)
        if missing:
            raise ValueError(f"{f} lacks {sorted(missing)}; an episode holds {sorted(keys)}")
        episodes.append({k: episode[k] for k in keys})
    return episodes, obs_space, act_space


def split_episodes(episodes: list, holdout: float) -> tuple[list, list]:
    """(training, held-out) episodes: every round(1 / holdout)-th episode is held out (at least one)."""
    if not 0 < holdout < 1 or len(episodes) < 2:
        raise ValueError(f"holdout {holdout} of {len(episodes)} episodes: need 0 < holdout < 1 and >= 2 episodes")
    every = max(2, round(1 / holdout))
    held = {i for i in range(len(episodes)) if i % every == every - 1} or {len(episodes) - 1}
    return [e for i, e in enumerate(episodes) if i not in held], [episodes[i] for i in sorted(held)]


class Windows:
    """Fixed-length windows from episodes laid end to end, as the replay's per-env stream is (the
    world model resets at each `is_first`)."""

    def __init__(self, episodes: list[dict[str, np.ndarray]], length: int):
        self.stream = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
        self.length = length
        self.size = len(self.stream["reward"])
        if self.size < length:
            raise ValueError(f"the episodes hold {self.size} steps, fewer than one window of {length} "
                             "(--run.seq-len); record more, or shorten the window")

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        starts = rng.integers(0, self.size - self.length + 1, batch_size)
        return self.at(starts)

    def at(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        index = np.asarray(starts)[:, None] + np.arange(self.length)
        return {k: v[index] for k, v in self.stream.items()}

    def tiling(self, max_windows: int) -> dict[str, np.ndarray]:
        """Up to `max_windows` non-overlapping windows from the start (for held-out figures)."""
        count = min(max_windows, self.size // self.length)
        return self.at(np.arange(count) * self.length)


# -- the world model alone ---------------------------------------------------------------------------


class WorldModelState(eqx.Module):
    """A world model in training: the model, its optimiser state and the update count."""

    world_model: WorldModel
    opt_state: optax.OptState
    step: Int[Array, ""]


def _optimizer(config: Config):
    return make_optimizer(config.agent.optim)


def init(config: Config, obs_space, act_space, key: PRNGKeyArray) -> WorldModelState:
    """A fresh world model as `agent.init` makes it for these spaces (so an agent can start from it)."""
    state = agent_lib.init(config.agent, spaces.obs_spec(obs_space), spaces.action_spec(act_space), key)
    return from_world_model(config, state.world_model)


def from_world_model(config: Config, wm: WorldModel) -> WorldModelState:
    return WorldModelState(wm, _optimizer(config).init(eqx.filter(wm, eqx.is_array)), jnp.zeros((), jnp.int32))


def _cont_discount(config: Config) -> float:
    ac = config.agent.actor_critic  # as agent._losses: the continue head learns gamma where it continues
    return 1.0 - 1.0 / ac.discount_horizon if ac.contdisc else 1.0


@eqx.filter_jit
def train_step(state: WorldModelState, batch: Mapping[str, Array], key: PRNGKeyArray, config: Config
               ) -> tuple[WorldModelState, dict[str, Array]]:
    """One update of the world model alone on `batch` (`[B, T]`, from a blank state), as the agent's
    world-model part of `agent.train`. `config` is static."""
    b = batch["is_first"].shape[0]

    def loss_fn(wm):
        return wm.loss(batch, wm.dynamics.initial(b), key, _cont_discount(config))

    (loss, (_, metrics)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.world_model)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, eqx.filter(state.world_model, eqx.is_array))
    wm = eqx.apply_updates(state.world_model, updates)
    return WorldModelState(wm, opt_state, state.step + 1), {**metrics, "loss/world_model": loss}


@eqx.filter_jit
def held_out(wm: WorldModel, batch: Mapping[str, Array], key: PRNGKeyArray, context: int, config: Config
             ) -> tuple[dict[str, Array], dict[str, Float[Array, " h"]]]:
    """The world model's losses on held-out windows, and its open-loop prediction error per horizon:
    after observing `context` steps, the mean squared error of the imagined observations, per step
    ahead (`[T - context]`; images in [0, 1] pixel units, vectors in symlog units, as the decoder's
    targets). A window counts at a horizon only while no episode has started in its imagined part
    (the model imagines one episode; the recording moved on to the next): NaN where none does."""
    b = batch["is_first"].shape[0]
    _, (_, metrics) = wm.loss(batch, wm.dynamics.initial(b), key, _cont_discount(config))
    pred = wm.open_loop(batch, wm.dynamics.initial(b), context, key)
    same_episode = jnp.cumsum(batch["is_first"][:, context:], 1) == 0  # [B, T - context]
    count = same_episode.sum(0)
    errors = {}
    for k, p in pred.items():
        truth = batch[k].astype(jnp.float32)
        truth = truth / 255.0 if k in wm.decoder.image_keys else symlog(truth)
        err = jnp.square(p - truth).reshape(*p.shape[:2], -1).mean(-1)[:, context:]  # [B, T - context]
        errors[k] = jnp.where(count > 0, (err * same_episode).sum(0) / jnp.maximum(count, 1), jnp.nan)
    return metrics, errors


def save(directory: Path, state: WorldModelState, config: Config, obs_space, act_space, meta: dict) -> None:
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(int(state.step), {"world_model_state": state}, None,
                  {**meta, "kind": "world_model", "config": to_dict(config),
                   "spaces": spaces.env_spaces_to_dict(obs_space, act_space)}, wait=True)


def load_world_model(run_dir: str | Path, config: Config, obs_space, act_space) -> WorldModel:
    """The world model that `experiments.train_world_model` saved in `run_dir`, for an agent with
    `config`'s world model on these spaces (they must match what it was trained with)."""
    directory = Path(run_dir) / "checkpoints"
    with Checkpointer(directory) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"--agent.init-world-model {run_dir}: no checkpoint in {directory}; pass the "
                                    "--run.logdir of `python -m experiments.train_world_model`")
        meta = ckpt.read_meta(step)
        if meta.get("kind") != "world_model":
            raise ValueError(f"--agent.init-world-model {run_dir}: not a world-model run (train one with "
                             "python -m experiments.train_world_model)")
        saved = from_dict(meta["config"]).agent.world_model
        _check_same(saved, config.agent.world_model, run_dir)
        saved_spaces = spaces.env_spaces_from_dict(meta["spaces"])
        if spaces.obs_spec(saved_spaces[0]) != spaces.obs_spec(obs_space) or \
                spaces.action_spec(saved_spaces[1]) != spaces.action_spec(act_space):
            raise ConfigError(f"--agent.init-world-model {run_dir}: trained on observations "
                              f"{spaces.obs_spec(saved_spaces[0])} and actions {spaces.action_spec(saved_spaces[1])}, "
                              f"this env has {spaces.obs_spec(obs_space)} and {spaces.action_spec(act_space)}")
        template = init(config, obs_space, act_space, jax.random.PRNGKey(0))
        restored, _, _, _ = ckpt.restore({"world_model_state": template}, None, step)
    return restored["world_model_state"].world_model


def _check_same(saved: WorldModelConfig, wanted: WorldModelConfig, run_dir) -> None:
    a, b = to_dict(saved), to_dict(wanted)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in differ[:4])
        raise ConfigError(f"--agent.init-world-model {run_dir}: its world model was trained with another config "
                          f"({detail}); give this run the same --preset / --agent.world-model.* options")
