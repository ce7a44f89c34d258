"""Frozen dataclass configs, named presets and override helpers.

A preset is a flat dict of dotted paths to values (`{"agent.world_model.units": 256}`); presets apply
in order on top of the defaults, so `("size12m", "catch")` means the catch run with the 12M model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from worldmodels import sharding
from worldmodels.agent import AgentConfig
from worldmodels.sequence import make_sequence_model


VIDEO_CONTEXT = 5  # steps an open-loop video observes before it imagines (DreamerV3's report)
VIDEO_LENGTH = 50  # steps per open-loop video, at most


@dataclass(frozen=True)
class RunConfig:
    """The training run around the agent (environment, budget, replay, logging, checkpoints)."""

    # envs.make name: gym:<id>, bsuite/<experiment>/<number> (the keys of bsuite.sweep.SETTINGS, e.g.
    # bsuite/memory_len/15 is memory length 30), dmc/<domain>-<task>, ...
    env: str = "gym:CartPole-v1"
    num_envs: int = 1
    parallel_envs: bool = False  # envs in subprocesses (the CLI uses envs.parallel: crashed ones restart)
    steps: int = 12_000  # environment steps, summed over envs (the host loop rounds up to a multiple of num_envs)
    train_ratio: float = 64.0  # replayed steps per environment step (see loop.py)
    batch_size: int = 16
    seq_len: int = 64
    # DreamerV3 2024's replay context: replay keeps every step's posterior latent, and each sampled
    # window gets one step more whose latent the training sequence starts from (see agent.py).
    replay_context: bool = True
    replay_capacity: int = 1_000_000  # steps, over all envs; allocated up front
    train_start: int = 1024  # environment steps collected before the first update
    eval_every: int = 0  # environment steps between greedy evaluations (0: never)
    eval_episodes: int = 5
    final_eval_episodes: int = 5  # greedy episodes at the end of the run, beside the training return (0: none)
    # Updates in a row with a non-finite loss or gradient (each skipped, the state unchanged) after
    # which the host loop stops, writing the batch to the run dir (0: never stop)
    max_skipped_updates: int = 20
    log_every: int = 1000  # environment steps between metric logs
    # Record each finished episode as <logdir>/episodes/<env step>-<env>.npz (worldmodels.offline), to
    # train world models offline (python -m experiments.train_world_model --data <logdir>/episodes)
    save_episodes: bool = False
    # Environment steps between open-loop prediction videos of replayed sequences (image observations;
    # 0: none): 5 observed steps, then up to 45 imagined, truth | model | error (agent.open_loop_video)
    video_every: int = 0
    eval_video: bool = False  # the same video of the first greedy evaluation episode at each evaluation
    checkpoint_every: int = 10_000  # environment steps between checkpoints (and at exit)
    seed: int = 0
    # The devices the loops train on (worldmodels.sharding): "data" splits each batch over every visible
    # device, "data=N" over the first N; "data=N,fsdp=M" also splits the agent state's big arrays over M.
    # The batch size (the device loop: num_envs) must be a multiple of the device count.
    mesh: str = "data"
    # Many processes (hosts), joined by jax.distributed (worldmodels.sharding.initialize_distributed):
    # "" one process; "host:port" of process 0 (with num_processes and each process's process_id); "auto"
    # (SLURM, Open MPI, Kubernetes, TPU pods, JAX_COORDINATOR_ADDRESS). Each process steps num_envs envs
    # into its own replay of replay_capacity steps; batch_size and steps are the run's, over all processes.
    coordinator: str = ""
    num_processes: int = 0  # 0: from the cluster's environment
    process_id: int = -1  # -1: from the cluster's environment
    coordinator_timeout: int = 60  # seconds to wait for every process to join
    # Unpickle the saved envs on resume even when this user's key did not sign them (worldmodels.signing):
    # only for your own runs, since unpickling runs code
    trust_env_pickle: bool = False
    logdir: str = "runs/default"
    tensorboard: bool = True
    wandb: str = ""  # a Weights & Biases project to log to as well ("": none; needs the wandb extra)
    progress: bool = True

    @property
    def window(self) -> int:
        """Steps per sampled replay window: seq_len, plus the context step with replay context."""
        return self.seq_len + int(self.replay_context)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)


def _size(deter: int, hidden: int, classes: int, depth: int) -> dict[str, Any]:
    return {"agent.world_model.sequence.rssm.deter": deter, "agent.world_model.sequence.rssm.hidden": hidden,
            "agent.world_model.sequence.rssm.classes": classes, "agent.world_model.cnn_depth": depth,
            "agent.world_model.units": hidden, "agent.actor_critic.units": hidden}


PRESETS: dict[str, dict[str, Any]] = {
    # Model sizes of DreamerV3 (2024); stoch is always 32 latents.
    "size1m": _size(512, 64, 4, 4),
    "size12m": _size(2048, 256, 16, 16),
    "size25m": _size(3072, 384, 24, 24),
    "size50m": _size(4096, 512, 32, 32),
    "size100m": _size(6144, 768, 48, 48),
    "size200m": _size(8192, 1024, 64, 64),
    "size400m": _size(12288, 1536, 96, 96),
    # A tiny model for tests and smoke runs.
    # Its image decoder has 2 blocks: its grid's 6 channels (depth 2) do not divide into 8.
    "debug": {**_size(64, 32, 4, 2), "agent.world_model.sequence.rssm.stoch": 8, "agent.world_model.layers": 2,
              "agent.actor_critic.layers": 2, "agent.world_model.decoder_blocks": 2, "agent.optim.warmup": 10,
              "run.batch_size": 4, "run.seq_len": 16,
              "run.train_start": 64, "run.steps": 512, "run.log_every": 128, "run.checkpoint_every": 256,
              "run.replay_capacity": 10_000, "run.tensorboard": False, "run.progress": False},
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def valid_paths(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted path to a leaf option of a config dataclass."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        out.extend(valid_paths(value, path + ".") if dataclasses.is_dataclass(value) else [path])
    return out


def override(config: Any, path: str, value: Any) -> Any:
    """A copy of `config` with the dotted `path` set to `value`; unknown paths raise KeyError."""
    head, _, rest = path.partition(".")
    if head not in _fields(type(config)):
        raise KeyError(f"unknown config key {path!r} in {type(config).__name__}; valid keys: "
                       f"{', '.join(valid_paths(config))}")
    if rest:
        return dataclasses.replace(config, **{head: override(getattr(config, head), rest, value)})
    old = getattr(config, head)
    if dataclasses.is_dataclass(old):
        raise KeyError(f"{path!r} is a group of options, not one option")
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(config, **{head: value})


def apply_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    for path, value in overrides.items():
        config = override(config, path, value)
    return config


def make_config(presets: Sequence[str] = (), overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then each named preset in order, then explicit `overrides` (dotted paths)."""
    config = Config()
    for name in presets:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        config = apply_overrides(config, PRESETS[name])
    return apply_overrides(config, overrides or {})


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: Mapping[str, Any], cls: type = Config) -> Any:
    """Inverse of `to_dict` (nested dicts -> nested frozen dataclasses; lists -> tuples)."""
    kwargs = {}
    for name, f in _fields(cls).items():
        if name not in data:
            continue
        value = data[name]
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            value = from_dict(value, type(default))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    unknown = set(data) - set(_fields(cls))
    if unknown:
        raise KeyError(f"unknown config keys {sorted(unknown)} for {cls.__name__}")
    return cls(**kwargs)


def dumps(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


class ConfigError(ValueError):
    """An option has a value the run cannot use; the message names the option and a valid value."""


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


# Bounds that no config may break: (low, low included) per option; int options also must be ints.
_AT_LEAST_ONE = ("run.num_envs", "run.steps", "run.batch_size", "run.seq_len", "run.replay_capacity",
                 "run.log_every", "agent.world_model.units", "agent.world_model.bins",
                 "agent.world_model.sequence.rssm.deter", "agent.world_model.sequence.rssm.hidden",
                 "agent.world_model.sequence.rssm.stoch", "agent.world_model.sequence.rssm.blocks",
                 "agent.world_model.sequence.s3m.deter", "agent.world_model.sequence.s3m.width",
                 "agent.world_model.sequence.s3m.state_size", "agent.world_model.sequence.s3m.layers",
                 "agent.world_model.sequence.s3m.hidden", "agent.world_model.sequence.s3m.stoch",
                 "agent.world_model.sequence.s3m.hippo_blocks", "agent.world_model.sequence.ffm.deter",
                 "agent.world_model.sequence.ffm.width", "agent.world_model.sequence.ffm.memory",
                 "agent.world_model.sequence.ffm.contexts", "agent.world_model.sequence.ffm.min_period",
                 "agent.world_model.sequence.ffm.hidden", "agent.world_model.sequence.ffm.stoch",
                 "agent.world_model.sequence.transformer.width", "agent.world_model.sequence.transformer.layers",
                 "agent.world_model.sequence.transformer.heads", "agent.world_model.sequence.transformer.ffn",
                 "agent.world_model.sequence.transformer.window", "agent.world_model.sequence.transformer.hidden",
                 "agent.world_model.sequence.transformer.stoch", "agent.actor_critic.units",
                 "agent.actor_critic.horizon", "agent.actor_critic.bins")
_AT_LEAST_ZERO = ("run.train_ratio", "run.train_start", "run.eval_every", "run.eval_episodes", "run.video_every",
                  "run.final_eval_episodes", "run.checkpoint_every", "run.max_skipped_updates", "agent.world_model.layers",
                  "agent.world_model.head_layers", "agent.world_model.head_units", "agent.world_model.cnn_depth",
                  "agent.world_model.free_nats", "agent.optim.warmup", "agent.optim.weight_decay",
                  "agent.actor_critic.entropy", "agent.actor_critic.layers", "agent.actor_critic.repval_scale")
_EXAMPLES = {"run.batch_size": 16, "run.seq_len": 64, "run.steps": 12_000, "run.train_ratio": 64,
             "agent.optim.lr": 4e-5, "agent.actor_critic.discount_horizon": 333, "agent.actor_critic.lam": 0.95}


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, value, declared type) of every option of a config dataclass."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_leaves(value, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", value, hints[f.name]))
    return out


def _type_problem(value: Any, hint: Any) -> str | None:
    """None if `value` fits the declared type `hint`, else what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return None if value in args else f"one of {', '.join(map(repr, args))}"
    if origin in (typing.Union, types.UnionType):
        return None if any(_type_problem(value, a) is None for a in args) else \
            " or ".join(getattr(a, "__name__", str(a)) for a in args)
    if hint is type(None):
        return None if value is None else "None"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        return None if isinstance(value, tuple) else "a list"
    return None


def replay_context_bytes(config: Config) -> int:
    """Bytes a step that replay context would store for the config's sequence model (its entry)."""
    sequence = config.agent.world_model.sequence
    model = jax.eval_shape(lambda: make_sequence_model(sequence, 1, 1, key=jax.random.PRNGKey(0)))
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in model.entry_spec().values())


def validate(config: Config) -> None:
    """Check every option before anything is built or compiled.

    **Raises:** `ConfigError` with one line that names the first bad option (as its CLI flag), the
    value given and a valid value.
    """
    def bad(path: str, value: Any, want: str) -> ConfigError:
        example = f" (e.g. {_flag(path)} {_EXAMPLES[path]})" if path in _EXAMPLES else ""
        return ConfigError(f"{_flag(path)} {value!r}: must be {want}{example}")

    values = {}
    for path, value, hint in _leaves(config):
        problem = _type_problem(value, hint)
        if problem is not None:
            raise bad(path, value, problem)
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(path, value, "a finite number")
        values[path] = value
    for path in _AT_LEAST_ONE:
        if values[path] < 1:
            raise bad(path, values[path], ">= 1")
    for path in _AT_LEAST_ZERO:
        if values[path] < 0:
            raise bad(path, values[path], ">= 0")
    for path in ("agent.optim.lr", "agent.optim.actor_lr", "agent.optim.critic_lr"):
        if values[path] is not None and values[path] <= 0:
            raise bad(path, values[path], "> 0")
    for path in ("agent.actor_critic.lam", "agent.optim.beta1", "agent.optim.beta2",
                 "agent.world_model.sequence.rssm.unimix", "agent.world_model.sequence.s3m.unimix",
                 "agent.world_model.sequence.ffm.unimix", "agent.world_model.sequence.transformer.unimix",
                 "agent.actor_critic.unimix", "agent.actor_critic.slow_rate"):
        if not 0 <= values[path] <= 1:
            raise bad(path, values[path], "in [0, 1]")
    try:
        sharding.devices_asked(values["run.mesh"])
    except ValueError:
        raise bad("run.mesh", values["run.mesh"], "'data' (every visible device), 'data=N' (the first N) or 'data=N,fsdp=M'") from None
    if values["agent.actor_critic.discount_horizon"] <= 1:
        raise bad("agent.actor_critic.discount_horizon", values["agent.actor_critic.discount_horizon"],
                  "> 1 (gamma = 1 - 1 / discount_horizon)")
    for path in ("agent.world_model.sequence.rssm.classes", "agent.world_model.sequence.s3m.classes",
                 "agent.world_model.sequence.ffm.classes", "agent.world_model.sequence.transformer.classes"):
        if values[path] < 2:
            raise bad(path, values[path], ">= 2 (classes of each categorical latent)")
    for path in ("agent.world_model.bins", "agent.actor_critic.bins"):
        if values[path] % 2 == 0:
            raise bad(path, values[path], "odd (twohot bins are symmetric around 0), e.g. 255")
    rssm = config.agent.world_model.sequence.rssm
    if rssm.deter % rssm.blocks:
        raise ConfigError(f"--agent.world-model.sequence.rssm.deter {rssm.deter}: must be a multiple of "
                          f"--agent.world-model.sequence.rssm.blocks {rssm.blocks} (the block GRU splits it), "
                          f"e.g. {rssm.blocks * max(1, round(rssm.deter / rssm.blocks))}")
    ffm = config.agent.world_model.sequence.ffm
    if ffm.max_period < ffm.min_period:
        raise ConfigError(f"--agent.world-model.sequence.ffm.max-period {ffm.max_period}: must be >= "
                          f"--agent.world-model.sequence.ffm.min-period {ffm.min_period} (the traces' decay "
                          f"periods span [min, max]), e.g. {max(1024, ffm.min_period)}")
    tf = config.agent.world_model.sequence.transformer
    if tf.width % tf.heads or (tf.width // tf.heads) % 2:
        raise ConfigError(f"--agent.world-model.sequence.transformer.width {tf.width}: must split into "
                          f"--agent.world-model.sequence.transformer.heads {tf.heads} heads of even size "
                          f"(rotary positions rotate pairs), e.g. {2 * tf.heads * max(1, round(tf.width / (2 * tf.heads)))}")
    sequence = config.agent.world_model.sequence
    problem = sequence.selected.window_problem(config.run.seq_len)
    if problem:
        raise ConfigError(problem)
    if config.run.replay_context and not sequence.selected.keeps_replay_context:
        raise ConfigError(f"--run.replay-context with --model {sequence.model}: replay would store each step's "
                          f"state ({replay_context_bytes(config)} bytes a step), which this model does not keep; use "
                          f"--run.no-replay-context (--model {sequence.model} sets it)")
    if not 0 <= config.agent.actor_critic.retnorm_low < config.agent.actor_critic.retnorm_high <= 100:
        raise ConfigError(f"--agent.actor-critic.retnorm-low {config.agent.actor_critic.retnorm_low!r} and "
                          f"--agent.actor-critic.retnorm-high {config.agent.actor_critic.retnorm_high!r}: must be "
                          "percentiles with 0 <= low < high <= 100, e.g. 5 and 95")
    rc = config.run
    if rc.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--run.wandb {rc.wandb!r} needs wandb, which is not installed: "
                          'pip install "worldmodels[wandb]" (WANDB_MODE=offline logs without a network)')
    if (rc.video_every or rc.eval_video) and importlib.util.find_spec("imageio") is None:
        raise ConfigError(f"--run.video-every {rc.video_every} / --run.eval-video {rc.eval_video}: videos need "
                          'imageio, which is not installed: pip install "worldmodels[video]"')
    if rc.video_every and rc.window <= VIDEO_CONTEXT:
        raise ConfigError(f"--run.video-every {rc.video_every}: a video observes {VIDEO_CONTEXT} replayed steps and "
                          f"imagines the rest of a window of {rc.window} (--run.seq-len {rc.seq_len}); use "
                          f"--run.seq-len {VIDEO_CONTEXT + 1} or more")
    per_env = rc.replay_capacity // rc.num_envs
    if per_env < rc.window:
        raise ConfigError(f"--run.replay-capacity {rc.replay_capacity}: holds {per_env} steps per env "
                          f"(--run.num-envs {rc.num_envs}), fewer than one sampled window of {rc.window} "
                          f"(--run.seq-len {rc.seq_len}{' + 1 context step' if rc.replay_context else ''}); "
                          f"give at least {rc.window * rc.num_envs}")
    if rc.eval_every and rc.eval_episodes < 1:
        raise ConfigError(f"--run.eval-episodes {rc.eval_episodes}: must be >= 1 when --run.eval-every is set "
                          f"({rc.eval_every}), e.g. --run.eval-episodes 5; or --run.eval-every 0 for none")
