"""The device loop: env stepping, policy, replay insertion and training in one compiled `lax.scan` chunk.

For JAX-native environments (a static env object with `observation_shape`, `num_actions` for discrete
actions or `action_size` for continuous ones in [-1, 1],
`reset(params, key) -> (state, timestep)` and `step(params, state, action, key) -> (state, timestep)`,
the timestep having `obs`, `reward`, `terminated`, `truncated`, `first`; e.g. `envs.jax`; an env whose
`partitionable` is False runs on one device only). This module
imports nothing from `envs/`: the env is duck-typed, and episodes are reset here the way gymnasium's
NEXT_STEP autoreset does (an already auto-resetting env works too).

The step convention is the host loop's (`worldmodels.loop`): stored step t holds o_t, the action
a_{t-1} that led to it (zero at `is_first`), r_t, `is_first`, `is_last`, `is_terminal`; an episode's
last observation is stored as its own step and the next step is the reset observation.

Structure of one chunk (a single jitted function, traced once):

    scan over U blocks:
        scan over S vector env steps: store the pending step, act, step all envs
        K updates on [B, T] windows sampled from the device replay (skipped until train_start)

S and K are static: one update replays B*T steps, so with N envs and train_ratio R (replayed steps
per env step) S = round(B*T / (R*N)) vector steps per update when that is >= 1, else S = 1 and
K = round(R*N / (B*T)) updates per vector step. train_ratio <= 0 means no training (env + policy).
The effective ratio B*T*K / (S*N) is reported, since the rounding can move it.

Checkpoints hold the whole carry (env states included), so a resumed run continues exactly.

On many devices (`run.mesh`, as the host loop's: `worldmodels.sharding`) the chunk is jitted with the
carry's shardings: everything per env (env states, policy carry, pending step, the device replay's
streams, episode counters) split along N over the devices, the agent state as the host loop lays it
out (replicated, or big arrays split over an fsdp axis), the counters and key replicated. GSPMD
partitions the program: each device steps and stores its own envs, and the sampled windows are
gathered from the devices that hold them.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from worldmodels import agent as agent_lib
from worldmodels import sharding
from worldmodels.agent import ActionSpec, AgentState, PolicyCarry
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import Config, ConfigError, RunConfig, dumps, to_dict, validate
from worldmodels.logging import RecentReturns, RunLogger, final_evaluation_report, recent_window
from worldmodels.replay import (DeviceReplay, replay_add, replay_init, replay_pad, replay_sample_windows,
                                replay_stored, replay_stored_part, replay_update)
from worldmodels.resume import (ConfigMismatchError, StopOnInterrupt, check_resumable, nonfinite_updates_error,
                                restore_usable, save_or_warn, skipped_in_a_row)

# How often the chunk has been traced (compiled); tests check it stays at one per program (see `_PROGRAMS`).
TRACE_COUNTS: collections.Counter = collections.Counter()

# Jitted functions shared by the loops that trace the same programs: equal config but for the run
# options below, equal env, equal schedule. A resumed or repeated run in one process (a notebook, a
# test) compiles nothing again. Keyed by `DeviceLoop._program_key`; the oldest entries are dropped.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_KEPT = 8
# Run options that only the Python loop around the chunk reads (budget, logging, checkpoints, evaluation).
_OUTSIDE_THE_CHUNK = ("steps", "logdir", "seed", "eval_every", "eval_episodes", "final_eval_episodes",
                      "checkpoint_every", "max_skipped_updates", "progress", "tensorboard", "wandb")

# The policy's un-jitted inner function: a jitted wrapper called inside a trace would only inline,
# but going through equinox's filter_jit there costs tracing time for nothing.
_policy = agent_lib.policy.__wrapped__
_replay_latent = agent_lib.replay_latent.__wrapped__

# --------------------------------------------------------------------------- the loop's carry

class LoopCarry(NamedTuple):
    """Everything the chunk carries (a PyTree of arrays; donated to each chunk call).

    `pending` is the step observed but not yet stored (key -> `[N, ...]`), as in the host loop.
    """

    agent: AgentState
    policy_carry: PolicyCarry
    env_state: Any  # the env's state PyTree, batched [N]
    done: Bool[Array, " n"]  # the env's last step ended its episode: the next step resets it
    pending: dict[str, Array]
    replay: DeviceReplay
    episode_return: Float[Array, " n"]
    episode_length: Int[Array, " n"]
    env_steps: Int[Array, ""]  # summed over envs
    updates: Int[Array, ""]
    key: PRNGKeyArray


class ChunkOutputs(NamedTuple):
    """What a chunk returns besides the carry (host-side logging).

    - `is_last`, `episode_return`, `episode_length`: `[U*S, N]` per vector step (the return and
      length are those of the episode so far; read them where `is_last`).
    - `metrics`: key -> `[U, K]` per update; `trained`: bool `[U]`, whether the block's updates ran.
    """

    is_last: Bool[Array, "steps n"]
    episode_return: Float[Array, "steps n"]
    episode_length: Int[Array, "steps n"]
    metrics: dict[str, Array]
    trained: Bool[Array, " u"]


@dataclass(frozen=True)
class Schedule:
    """The static chunk shape: U blocks of S vector steps and K updates; N envs."""

    blocks: int  # U
    steps_per_block: int  # S (vector steps)
    updates_per_block: int  # K (0: no training)
    num_envs: int  # N

    @property
    def env_steps_per_chunk(self) -> int:
        return self.blocks * self.steps_per_block * self.num_envs

    def effective_train_ratio(self, batch_size: int, seq_len: int) -> float:
        return batch_size * seq_len * self.updates_per_block / (self.steps_per_block * self.num_envs)


def make_schedule(train_ratio: float, batch_size: int, seq_len: int, num_envs: int,
                  chunk_env_steps: int) -> Schedule:
    """S, K and U from the train ratio (see the module docstring); U makes a chunk about
    `chunk_env_steps` env steps (at least one block)."""
    if train_ratio <= 0:
        steps, updates = max(1, round(chunk_env_steps / num_envs)), 0
    else:
        per_update = batch_size * seq_len / (train_ratio * num_envs)  # vector steps per update
        if per_update >= 1:
            steps, updates = round(per_update), 1
        else:
            steps, updates = 1, max(1, round(1 / per_update))
    blocks = max(1, round(chunk_env_steps / (steps * num_envs)))
    return Schedule(blocks, steps, updates, num_envs)


# --------------------------------------------------------------------------- the loop

def _obs_layout(env: Any, env_params: Any) -> tuple[str, tuple[int, ...], str]:
    """The agent's observation key, shape and dtype for the env's observation (as `spaces.obs_spec`
    maps the host env's Box: uint8 [H, W, C] is an `image`, anything else a flat float32 `vector`)."""
    _, timestep = jax.eval_shape(env.reset, env_params, jax.random.PRNGKey(0))
    shape, dtype = tuple(timestep.obs.shape), jnp.dtype(timestep.obs.dtype)
    if tuple(env.observation_shape) != shape:
        raise ValueError(f"env.observation_shape {env.observation_shape} differs from its reset's obs shape {shape}")
    if len(shape) == 3 and dtype == jnp.uint8:
        return "image", shape, "uint8"
    return "vector", (int(np.prod(shape)),), "float32"


class DeviceLoop:
    """The compiled pieces of a device-loop run: `init(key) -> LoopCarry` and
    `chunk(carry, env_params) -> (carry, ChunkOutputs)` (jitted once, the carry donated). Loops of
    the same program (equal config but for the run's budget, seed, logdir, logging, checkpointing and
    evaluation; an equal, hashable env) share their jitted functions, so they compile once per process.

    **Arguments:** `config` (its `run.num_envs`, `train_ratio`, `batch_size`, `seq_len`,
    `replay_capacity`, `train_start` are used), a duck-typed JAX env (see the module docstring) and
    its params, `chunk_env_steps`: about how many env steps one chunk runs (default `run.log_every`).
    """

    def __init__(self, config: Config, env: Any, env_params: Any, chunk_env_steps: int | None = None):
        rc = config.run
        for name in ("observation_shape", "reset", "step"):
            if not hasattr(env, name):
                raise TypeError(f"the device loop needs a JAX env with `{name}` (e.g. from envs.jax.make), "
                                f"got {type(env).__name__}")
        if not (hasattr(env, "num_actions") or hasattr(env, "action_size")):
            raise TypeError(f"the device loop needs a JAX env with `num_actions` (discrete actions) or `action_size` "
                            f"(continuous actions in [-1, 1]), got {type(env).__name__}")
        self.config, self.env = config, env
        self.num_envs = n = rc.num_envs
        self.capacity_per_env = rc.replay_capacity // n
        if self.capacity_per_env < rc.window:
            raise ValueError(f"replay_capacity {rc.replay_capacity} gives {self.capacity_per_env} steps per env, "
                             f"fewer than a window of {rc.window} (seq_len {rc.seq_len}, replay_context "
                             f"{rc.replay_context}): nothing could ever be sampled")
        self.obs_key, obs_shape, obs_dtype = _obs_layout(env, env_params)
        self.obs_spec = {self.obs_key: (obs_shape, obs_dtype)}
        discrete = hasattr(env, "num_actions")
        self.action_spec = ActionSpec(int(env.num_actions if discrete else env.action_size), discrete)
        self.step_spec: dict[str, tuple[tuple[int, ...], str]] = {
            **self.obs_spec, "action": ((self.action_spec.dim,), "float32"), "reward": ((), "float32"),
            "is_first": ((), "bool"), "is_last": ((), "bool"), "is_terminal": ((), "bool")}
        self.schedule = make_schedule(rc.train_ratio, rc.batch_size, rc.seq_len, n,
                                      chunk_env_steps or rc.log_every)
        mesh = sharding.make_mesh(rc.mesh)
        self.mesh = mesh if sharding.data_size(mesh) > 1 else None
        if self.mesh is not None:  # each device steps and stores its own envs
            sharding.check_batch("--run.num-envs", n, mesh)
            if not getattr(env, "partitionable", True):
                raise ValueError(f"{env!r} cannot be split over the {sharding.data_size(mesh)} devices of --run.mesh "
                                 f"{rc.mesh!r} (its steps are calls that XLA cannot partition, e.g. MuJoCo Warp's "
                                 "physics and renderer): run it on one device (--run.mesh data=1)")
        self._program_key = self._make_program_key()
        # with a mesh, `place` jits it again with the carry's shardings
        self.chunk = self._shared("chunk", lambda: jax.jit(
            self._chunk, donate_argnums=0, compiler_options=agent_lib.compiler_options(jax.default_backend())))
        self._evaluate_jit = self._shared("evaluate", lambda: jax.jit(self._evaluate, static_argnums=(3, 4)))
        self._reset_envs = self._shared("reset", lambda: jax.jit(jax.vmap(self._env_reset, in_axes=(None, 0))))

    def _make_program_key(self) -> Any:
        """What fixes the traced programs: the config less `_OUTSIDE_THE_CHUNK`, the env, the schedule;
        None if the env is not hashable (then nothing is shared)."""
        defaults = RunConfig()
        run = dataclasses.replace(self.config.run, **{name: getattr(defaults, name) for name in _OUTSIDE_THE_CHUNK})
        key = (dataclasses.replace(self.config, run=run), self.env, self.schedule)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _shared(self, name: str, make: Any) -> Any:
        """`make()`, or the function an earlier loop with the same program key made under `name`."""
        if self._program_key is None:
            return make()
        key = (name, self._program_key)
        if key not in _PROGRAMS:
            _PROGRAMS[key] = make()
            while len(_PROGRAMS) > _PROGRAMS_KEPT:
                _PROGRAMS.popitem(last=False)
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]

    # -- env stepping (one env; vmapped over N)

    def _env_reset(self, params: Any, key: PRNGKeyArray) -> tuple[Any, Any]:
        return self.env.reset(params, key)

    def _env_action(self, action: Float[Array, "n a"]) -> Array:
        """The policy's actions as the env takes them: an index for one-hot discrete actions, else the
        vector in [-1, 1]."""
        return jnp.argmax(action, -1) if self.action_spec.discrete else action

    def _to_step(self, timestep: Any, action: Float[Array, "n a"]) -> dict[str, Array]:
        """A batched env timestep and the action into it -> one stored step (the host convention)."""
        n = action.shape[0]
        (shape, dtype), = self.obs_spec.values()
        first = jnp.asarray(timestep.first, bool)
        terminated, truncated = jnp.asarray(timestep.terminated, bool), jnp.asarray(timestep.truncated, bool)
        return {self.obs_key: jnp.asarray(timestep.obs).reshape(n, *shape).astype(dtype),
                "reward": jnp.asarray(timestep.reward, jnp.float32),
                "is_first": first, "is_last": (terminated | truncated) & ~first, "is_terminal": terminated & ~first,
                "action": jnp.where(first[:, None], 0.0, action).astype(jnp.float32)}

    # -- init

    def init(self, key: PRNGKeyArray, env_params: Any) -> LoopCarry:
        """A fresh run: new agent, envs reset, empty replay. `key` seeds everything."""
        n = self.num_envs
        k_agent, k_env, k_loop = jax.random.split(key, 3)
        agent = agent_lib.init(self.config.agent, self.obs_spec, self.action_spec, k_agent)
        env_state, timestep = self._reset_envs(env_params, jax.random.split(k_env, n))
        pending = self._to_step(timestep, jnp.zeros((n, self.action_spec.dim)))
        latent_spec = agent_lib.latent_spec(agent) if self.config.run.replay_context else {}
        replay = replay_init({**self.step_spec, **latent_spec}, n, self.capacity_per_env)
        carry = LoopCarry(agent, agent_lib.initial_carry(agent, n), env_state, jnp.zeros(n, bool), pending, replay,
                          jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32), jnp.zeros((), jnp.int32),
                          jnp.zeros((), jnp.int32), k_loop)
        return fresh_buffers(carry)

    def place(self, carry: LoopCarry) -> LoopCarry:
        """The carry on the mesh (see the module docstring), and `chunk` compiled for that layout; without
        a mesh, the carry committed to its device (`sharding.put_committed`)."""
        if self.mesh is None:
            return sharding.put_committed(carry)
        mesh, n = self.mesh, self.num_envs
        split, everywhere = sharding.split_batch(mesh), sharding.replicated(mesh)
        per_env = lambda x: split if x.ndim >= 1 and x.shape[0] == n else everywhere
        shardings = LoopCarry(
            agent=sharding.state_shardings(sharding.state_specs(carry.agent, mesh), mesh),
            **{name: jax.tree.map(per_env, getattr(carry, name)) for name in
               ("policy_carry", "env_state", "done", "pending", "replay", "episode_return", "episode_length")},
            env_steps=everywhere, updates=everywhere, key=everywhere)
        self.chunk = self._shared("placed chunk", lambda: jax.jit(
            self._chunk, donate_argnums=0, in_shardings=(shardings, everywhere), out_shardings=(shardings, everywhere),
            compiler_options=agent_lib.compiler_options(jax.default_backend())))
        return jax.device_put(carry, shardings)

    # -- greedy evaluation

    def _evaluate(self, agent: AgentState, env_params: Any, key: PRNGKeyArray, episodes: int,
                  max_steps: int) -> tuple[Float[Array, " e"], Int[Array, " e"]]:
        """One greedy episode in each of `episodes` fresh envs (stepped together until all have ended
        or `max_steps`); returns their returns and lengths."""
        k_reset, k_loop = jax.random.split(key)
        env_state, timestep = jax.vmap(self._env_reset, in_axes=(None, 0))(env_params,
                                                                             jax.random.split(k_reset, episodes))
        obs = self._to_step(timestep, jnp.zeros((episodes, self.action_spec.dim)))[self.obs_key]
        init = (env_state, agent_lib.initial_carry(agent, episodes), obs, jnp.ones(episodes, bool),
                jnp.zeros(episodes, bool), jnp.zeros(episodes, jnp.float32), jnp.zeros(episodes, jnp.int32),
                jnp.zeros((), jnp.int32), k_loop)

        def running(c):
            done, t = c[4], c[7]
            return ~jnp.all(done) & (t < max_steps)

        def step(c):
            env_state, carry, obs, first, done, ret, length, t, key = c
            key, k_act, k_env = jax.random.split(key, 3)
            action, carry = _policy(agent, carry, {self.obs_key: obs, "is_first": first}, k_act, True)
            env_state, timestep = jax.vmap(self.env.step, in_axes=(None, 0, 0, 0))(
                env_params, env_state, self._env_action(action), jax.random.split(k_env, episodes))
            stepped = self._to_step(timestep, action)
            ret = ret + jnp.where(done, 0.0, stepped["reward"])
            length = length + jnp.where(done, 0, 1)
            done = done | jnp.asarray(timestep.terminated, bool) | jnp.asarray(timestep.truncated, bool)
            return env_state, carry, stepped[self.obs_key], jnp.zeros_like(first), done, ret, length, t + 1, key

        final = jax.lax.while_loop(running, step, init)
        return final[5], final[6]

    def evaluate(self, agent: AgentState, env_params: Any, key: PRNGKeyArray, episodes: int,
                 max_steps: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        """Greedy episodes in fresh envs (jitted per episode count): (returns `[episodes]`, lengths)."""
        returns, lengths = self._evaluate_jit(agent, env_params, key, episodes, max_steps)
        return np.asarray(returns), np.asarray(lengths)

    # -- the chunk

    def _collect(self, env_params: Any, c: LoopCarry, _: Any) -> tuple[LoopCarry, tuple[Array, Array, Array]]:
        """One vector step: act on the pending step, store it, step the envs (the host loop's step 1)."""
        key, k_act, k_env = jax.random.split(c.key, 3)
        obs = {self.obs_key: c.pending[self.obs_key], "is_first": c.pending["is_first"]}
        action, policy_carry = _policy(c.agent, c.policy_carry, obs, k_act)
        latent = _replay_latent(c.agent, policy_carry) if self.config.run.replay_context else {}
        replay = replay_add(c.replay, {**c.pending, **latent})
        env_state, done, timestep = step_envs(self.env, env_params, c.env_state, c.done, self._env_action(action),
                                               k_env)
        pending = self._to_step(timestep, action)
        first = pending["is_first"]
        episode_return = jnp.where(first, 0.0, c.episode_return + pending["reward"])
        episode_length = jnp.where(first, 0, c.episode_length + 1)
        c = c._replace(policy_carry=policy_carry, env_state=env_state, done=done, pending=pending, replay=replay,
                       episode_return=episode_return, episode_length=episode_length,
                       env_steps=c.env_steps + self.num_envs, key=key)
        return c, (pending["is_last"], episode_return, episode_length)

    def _train_block(self, c: LoopCarry) -> tuple[LoopCarry, dict[str, Array], Bool[Array, ""]]:
        """K updates on sampled windows, or none (zeros for metrics) until train_start steps and a full
        window per env stream are stored."""
        rc, k = self.config.run, self.schedule.updates_per_block

        def updates(agent: AgentState, replay: DeviceReplay, key: PRNGKeyArray
                    ) -> tuple[tuple[AgentState, DeviceReplay], dict[str, Array]]:
            def one(carry, key):
                agent, replay = carry
                k_sample, k_train = jax.random.split(key)
                batch, (env, slots) = replay_sample_windows(replay, rc.batch_size, rc.window, k_sample)
                agent, metrics, latents = agent_lib._train(agent, batch, k_train)
                if rc.replay_context:  # the trained steps' new posteriors replace the stored ones
                    replay = replay_update(replay, env, slots, latents, offset=1)
                return (agent, replay), metrics
            return jax.lax.scan(one, (agent, replay), jax.random.split(key, k))

        key, k_train = jax.random.split(c.key)
        shapes = jax.eval_shape(updates, c.agent, c.replay, k_train)[1]
        skip = lambda agent, replay, key: ((agent, replay), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        ready = (c.env_steps >= rc.train_start) & (replay_stored(c.replay) >= rc.window)
        (agent, replay), metrics = jax.lax.cond(ready, updates, skip, c.agent, c.replay, k_train)
        c = c._replace(agent=agent, replay=replay, key=key, updates=c.updates + jnp.where(ready, k, 0))
        return c, metrics, ready

    def _chunk(self, carry: LoopCarry, env_params: Any) -> tuple[LoopCarry, ChunkOutputs]:
        TRACE_COUNTS["chunk"] += 1
        s = self.schedule

        def block(c: LoopCarry, _: Any):
            c, (is_last, ret, length) = jax.lax.scan(lambda c, x: self._collect(env_params, c, x), c, None,
                                                     length=s.steps_per_block)
            if s.updates_per_block:
                c, metrics, ready = self._train_block(c)
            else:
                metrics, ready = {}, jnp.zeros((), bool)
            return c, (is_last, ret, length, metrics, ready)

        carry, (is_last, ret, length, metrics, trained) = jax.lax.scan(block, carry, None, length=s.blocks)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # [U, S, N] -> [U*S, N]
        return carry, ChunkOutputs(flat(is_last), flat(ret), flat(length), metrics, trained)


def step_envs(env: Any, params: Any, state: Any, done: Bool[Array, " n"], action: Int[Array, " n"] | Float[Array, "n a"],
              key: PRNGKeyArray) -> tuple[Any, Bool[Array, " n"], Any]:
    """N envs one step (`state`: a batch of `env`'s states, leading axis N), with NEXT_STEP autoreset:
    after an episode's last step (`done`), the env's next step is a reset (its action is ignored).
    Returns (states, done, timesteps). This is the device loop's vector step.

    The resets are computed only when some env needs one, then selected per env: an MJX env's reset is
    a physics forward (and with images, a render). Leaves without an env axis (MuJoCo Warp's buffers
    shared by all worlds) are the step's. (`envs.jax.AutoReset` under `vmap` selects every leaf inside
    the vmap: with MuJoCo Warp physics that leaks a tracer out of its FFI calls; this does not.)
    """
    n = done.shape[0]
    keys = jax.vmap(jax.random.split)(jax.random.split(key, n))  # [n, 2]: step, reset
    stepped = jax.vmap(env.step, in_axes=(None, 0, 0, 0))(params, state, action, keys[:, 0])

    def reset(stepped):
        fresh = jax.vmap(env.reset, in_axes=(None, 0))(params, keys[:, 1])
        return jax.tree.map(lambda f, s: jnp.asarray(f, s.dtype), fresh, stepped)

    def select(fresh, stepped):
        if jnp.ndim(stepped) == 0 or stepped.shape[0] != n:
            return stepped
        return jnp.where(done.reshape(-1, *(1,) * (stepped.ndim - 1)), fresh, stepped)

    fresh = jax.lax.cond(jnp.any(done), reset, lambda stepped: stepped, stepped)
    state, timestep = jax.tree.map(select, fresh, stepped)
    return state, jnp.asarray(timestep.terminated | timestep.truncated, bool), timestep


def fresh_buffers(tree: Any) -> Any:
    """Every array leaf copied into its own buffer. The chunk donates its carry, and a buffer may not be
    donated twice: eager ops or a restore can hand back one array for two leaves (e.g. equal initial
    latents)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def check_options(config: Config) -> None:
    """Refuse the host loop's options that the device loop does not have (`ConfigError`)."""
    host_only = {"--run.save-episodes": config.run.save_episodes, "--run.video-every": config.run.video_every,
                 "--run.eval-video": config.run.eval_video, "--agent.init-world-model": config.agent.init_world_model}
    asked = [flag for flag, value in host_only.items() if value]
    if config.run.coordinator:
        raise ConfigError("--run.coordinator: the device loop runs in one process (its envs and replay live on "
                          "that process's devices); use the host loop for many processes, or drop --run.coordinator")
    if asked:
        raise ConfigError(f"{', '.join(asked)}: options of the host loop only (the device loop's JAX envs have "
                          "no images, and it records no episodes); drop them, or drop --device-loop")


def run_on_device(config: Config, env: Any, env_params: Any, chunk_env_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `config.run.logdir` for `config.run.steps` env steps (rounded up to
    whole chunks) with the device loop, logging `metrics.jsonl` (one line per chunk) and `scores.jsonl`
    as the host loop does.

    Checkpoints hold the whole loop carry (agent, policy carry, env states, pending step, device replay,
    episode counters, PRNG key): every `run.checkpoint_every` env steps (at the next chunk boundary)
    and at exit, including a first Ctrl-C (a second one aborts; the last checkpoint stays usable).
    Starting again in the same logdir resumes exactly where the last checkpoint left off. Greedy
    evaluation episodes (`run.eval_episodes` fresh envs) run every `run.eval_every` env steps.

    **Arguments:** see `DeviceLoop`.

    A run that reaches its budget ends with `run.final_eval_episodes` greedy episodes, as the host
    loop's does.

    **Returns:** a summary: env steps, updates, episodes, the recent return (as the host loop's), the
    greedy episodes at the end (`eval_return`, `eval_returns`), wall time, the first chunk's
    time (it includes compiling), env steps/s after the first chunk, the schedule, and the final
    agent `state` and `replay`.
    """
    validate(config)  # before anything is built or compiled
    check_options(config)
    rc = config.run
    logdir = Path(rc.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    check_resumable(logdir, config)

    loop = DeviceLoop(config, env, env_params, chunk_env_steps)
    s = loop.schedule
    carry = loop.place(loop.init(jax.random.PRNGKey(rc.seed), env_params))
    if loop.mesh is not None:
        print(f"mesh: {sharding.data_size(loop.mesh)} devices ({jax.devices()[0].platform}); the {rc.num_envs} envs "
              "and their replay split over them")
    print(f"device loop: {agent_lib.count_params(carry.agent.params):,} parameters; chunk = {s.blocks} blocks x "
          f"({s.steps_per_block} steps x {s.num_envs} envs + {s.updates_per_block} updates) = "
          f"{s.env_steps_per_chunk} env steps; effective train_ratio "
          f"{s.effective_train_ratio(rc.batch_size, rc.seq_len):g} (asked {rc.train_ratio:g})")

    counters = {"episodes": 0, "last_checkpoint": 0, "last_eval": 0}
    recent = RecentReturns(recent_window(rc.steps))  # the episodes that ended in the run's last tenth
    ckpt = Checkpointer(logdir / "checkpoints", max_to_keep=2)
    if ckpt.latest_step() is not None:
        # shapes only: the fresh carry's empty replay must not stay in memory next to the restored one
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), carry)
        del carry

        def restore_step(step: int) -> tuple[LoopCarry, dict]:
            saved_meta = ckpt.read_meta(step)
            if saved_meta.get("loop") != "device":
                raise ConfigMismatchError(f"{logdir} holds a run of the host loop: resume it without --device-loop, "
                                          "or pass a new --run.logdir.")
            # Checkpoints hold the replay's stored part (older ones the whole ring): the metadata says how much.
            stored = saved_meta.get("replay_stored", loop.capacity_per_env)
            part = lambda x: jax.ShapeDtypeStruct((x.shape[0], stored, *x.shape[2:]), x.dtype, sharding=x.sharding)
            template = like._replace(replay=like.replay._replace(data=jax.tree.map(part, like.replay.data)))
            restored, _, meta, _ = ckpt.restore({"carry": template}, None, step=step)
            restored = fresh_buffers(restored["carry"])
            return restored._replace(replay=replay_pad(restored.replay, loop.capacity_per_env)), meta

        carry, meta = restore_usable(ckpt, logdir, restore_step)
        carry = loop.place(carry)  # the padded replay and fresh buffers: back onto the mesh's layout
        counters = meta["counters"]
        recent.load(meta.get("recent_returns", []), int(carry.env_steps))
        print(f"resumed from {logdir} at env step {int(carry.env_steps)} ({int(carry.updates)} updates)")
    (logdir / "config.json").write_text(dumps(config))
    saved: list[int] = []  # the steps checkpointed by this call

    def checkpoint(wait: bool = False) -> None:
        stored = int(replay_stored(carry.replay))
        meta = {"loop": "device", "counters": counters, "recent_returns": recent.state(), "replay_stored": stored,
                "config": to_dict(config)}
        step = int(carry.env_steps)
        # set before the save, so that the checkpoint holds it (a resumed run does not save again at once),
        # and after a full disk the next try comes at the next interval
        counters["last_checkpoint"] = step
        if save_or_warn(lambda: ckpt.save(step, {"carry": carry._replace(replay=replay_stored_part(carry.replay, stored))},
                                          None, meta, wait=wait), step, ckpt):
            saved.append(step)

    logger = RunLogger(logdir, rc.tensorboard, start_step=int(carry.env_steps), wandb_project=rc.wandb,
                       config=to_dict(config))
    env_steps, updates = int(carry.env_steps), int(carry.updates)
    start, start_steps, start_updates = time.time(), env_steps, updates
    first_chunk_s, after_first = None, None
    skips = 0  # updates the non-finite guard skipped, in a row, across chunks
    final_eval: dict[str, Any] = {}
    clean_exit = False
    try:
        with StopOnInterrupt() as flag:
            while env_steps < rc.steps and not flag.stop:
                chunk_start_steps = env_steps
                carry, out = loop.chunk(carry, env_params)
                out = jax.device_get(out)
                env_steps, updates = int(carry.env_steps), int(carry.updates)
                if first_chunk_s is None:
                    first_chunk_s, after_first = time.time() - start, (time.time(), env_steps)
                # scores: vector step t of the chunk ends at env step start + (t + 1) * N
                for t, i in zip(*np.nonzero(out.is_last)):
                    counters["episodes"] += 1
                    end_step = chunk_start_steps + (t + 1) * s.num_envs
                    recent.add(end_step, float(out.episode_return[t, i]))
                    logger.score(end_step, "train", out.episode_return[t, i], out.episode_length[t, i])
                elapsed = max(time.time() - start, 1e-9)
                values: dict[str, Any] = {"env_steps_per_s": (env_steps - start_steps) / elapsed,
                                          "updates_per_s": (updates - start_updates) / elapsed,
                                          "updates": updates, "episodes": counters["episodes"]}
                recent_returns = recent.returns(env_steps)
                if recent_returns:
                    values["train/return_recent"] = float(np.mean(recent_returns))
                    values["train/return_recent_episodes"] = len(recent_returns)
                if out.trained.any():
                    values.update({k: float(np.mean(v[out.trained])) for k, v in out.metrics.items()})
                    skipped = out.metrics["train/skipped"][out.trained].reshape(-1)  # the chunk's updates, in order
                    values["train/skipped_updates"] = int(skipped.sum())
                    skips = skipped_in_a_row(skips, skipped)
                logger.metrics(env_steps, values)
                if rc.max_skipped_updates and skips >= rc.max_skipped_updates:
                    raise nonfinite_updates_error(
                        skips, f"in the chunk that ended at env step {env_steps} (update {updates})",
                        {k: v[out.trained][-1, -1] for k, v in out.metrics.items()},
                        "The device loop samples its batches inside the program: rerun the host loop (without "
                        "--device-loop) to get the batch written.", ckpt.all_steps())
                if rc.eval_every and env_steps - counters["last_eval"] >= rc.eval_every:
                    counters["last_eval"] = env_steps
                    # A key of its own (not from the carry), so evaluating never changes training.
                    key = jax.random.fold_in(jax.random.PRNGKey(rc.seed + 2), env_steps)
                    for ret, length in zip(*loop.evaluate(carry.agent, env_params, key, rc.eval_episodes)):
                        logger.score(env_steps, "eval", ret, length)
                if rc.checkpoint_every and env_steps - counters["last_checkpoint"] >= rc.checkpoint_every:
                    # written before the next chunk (as the host loop's, which writes its replay at once):
                    # a kill then loses at most checkpoint_every env steps, not also those of a write in flight
                    checkpoint(wait=True)
            if env_steps >= rc.steps > start_steps and rc.final_eval_episodes > 0:
                key = jax.random.fold_in(jax.random.PRNGKey(rc.seed + 3), env_steps)
                returns, lengths = loop.evaluate(carry.agent, env_params, key, rc.final_eval_episodes)
                final_eval = final_evaluation_report(logger, env_steps, returns, lengths, recent)
        clean_exit = True
    finally:
        # After a crash (or a second Ctrl-C) mid-chunk the carry's buffers may be donated or stale:
        # the previous checkpoint stays the one to resume from.
        if clean_exit and (counters["last_checkpoint"] != env_steps or not (saved or ckpt.all_steps())):
            checkpoint(wait=True)
        ckpt.close()
        logger.close()
    elapsed = time.time() - start
    steady = None
    if after_first is not None and env_steps > after_first[1]:
        steady = (env_steps - after_first[1]) / max(time.time() - after_first[0], 1e-9)
    return {"env_steps": env_steps, "updates": updates, "episodes": counters["episodes"],
            "recent_return": recent.mean(env_steps), "recent_episodes": len(recent.returns(env_steps)),
            "recent_window_steps": recent.window, **final_eval, "seconds": elapsed,
            "first_chunk_seconds": first_chunk_s, "env_steps_per_s_after_first_chunk": steady,
            "schedule": s, "state": carry.agent, "replay": carry.replay}
