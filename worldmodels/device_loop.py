"""The device loop: env stepping, policy, replay insertion and training in one compiled `lax.scan` chunk.

For JAX-native environments (a static env object with `observation_shape`, `num_actions`,
`reset(params, key) -> (state, timestep)` and `step(params, state, action, key) -> (state, timestep)`,
the timestep having `obs`, `reward`, `terminated`, `truncated`, `first`; e.g. `envs.jax`). This module
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

Not yet: checkpoints / resume, evaluation episodes.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from worldmodels import agent as agent_lib
from worldmodels.agent import ActionSpec, AgentState, PolicyCarry
from worldmodels.config import Config, dumps
from worldmodels.logging import RunLogger

# How often the chunk has been traced (compiled); tests check it stays at one per DeviceLoop.
TRACE_COUNTS: collections.Counter = collections.Counter()

# The policy's un-jitted inner function: a jitted wrapper called inside a trace would only inline,
# but going through equinox's filter_jit there costs tracing time for nothing.
_policy = agent_lib.policy.__wrapped__

StepSpec = Mapping[str, tuple[tuple[int, ...], str]]


# --------------------------------------------------------------------------- device replay

class DeviceReplay(NamedTuple):
    """A FIFO ring buffer of JAX arrays per env stream (a PyTree, carried through the scan).

    - `data`: key -> `[N, C, *shape]` (N env streams, C steps each).
    - `written`: int32 scalar, steps ever written per env stream (the same for every stream); the
      next write goes to slot `written % C`.
    """

    data: dict[str, Array]
    written: Int[Array, ""]


def replay_init(spec: StepSpec, num_envs: int, capacity_per_env: int) -> DeviceReplay:
    """An empty replay: zeros of `[num_envs, capacity_per_env, *shape]` per key of `spec`."""
    if num_envs < 1 or capacity_per_env < 1:
        raise ValueError(f"device replay needs num_envs >= 1 and capacity_per_env >= 1, got {num_envs}, "
                         f"{capacity_per_env}")
    data = {k: jnp.zeros((num_envs, capacity_per_env, *shape), dtype) for k, (shape, dtype) in spec.items()}
    return DeviceReplay(data, jnp.zeros((), jnp.int32))


def replay_add(replay: DeviceReplay, step: Mapping[str, Array]) -> DeviceReplay:
    """Write one step (key -> `[N, *shape]`) to every env stream, overwriting the oldest when full."""
    capacity = next(iter(replay.data.values())).shape[1]
    slot = replay.written % capacity
    data = {k: v.at[:, slot].set(jnp.asarray(step[k], v.dtype)) for k, v in replay.data.items()}
    return DeviceReplay(data, replay.written + 1)


def replay_stored(replay: DeviceReplay) -> Int[Array, ""]:
    """Steps currently stored per env stream."""
    capacity = next(iter(replay.data.values())).shape[1]
    return jnp.minimum(replay.written, capacity)


def replay_sample(replay: DeviceReplay, batch_size: int, seq_len: int, key: PRNGKeyArray) -> dict[str, Array]:
    """`batch_size` windows of `seq_len` consecutive steps, uniform over all valid windows.

    As the host `ReplayBuffer.sample`: a window lies inside one env stream, in written order, never
    touches an unwritten slot or jumps across the write pointer; it may cross episode boundaries.
    Only meaningful when `replay_stored(replay) >= seq_len` (the caller checks; under jit it cannot
    raise), otherwise windows repeat the stored steps' slots.

    **Returns:** key -> `[B, T, *shape]`.
    """
    num_envs, capacity = next(iter(replay.data.values())).shape[:2]
    stored = replay_stored(replay)
    starts_per_env = jnp.maximum(stored - seq_len + 1, 1)
    flat = jax.random.randint(key, (batch_size,), 0, num_envs * starts_per_env)
    env, start = flat // starts_per_env, flat % starts_per_env
    oldest = (replay.written - stored) % capacity  # chronological index i lives at slot (oldest + i) % C
    slots = (oldest + start[:, None] + jnp.arange(seq_len)) % capacity  # [B, T]
    return {k: v[env[:, None], slots] for k, v in replay.data.items()}


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
    `chunk(carry, env_params) -> (carry, ChunkOutputs)` (jitted once, the carry donated).

    **Arguments:** `config` (its `run.num_envs`, `train_ratio`, `batch_size`, `seq_len`,
    `replay_capacity`, `train_start` are used), a duck-typed JAX env (see the module docstring) and
    its params, `chunk_env_steps`: about how many env steps one chunk runs (default `run.log_every`).
    """

    def __init__(self, config: Config, env: Any, env_params: Any, chunk_env_steps: int | None = None):
        rc = config.run
        for name in ("observation_shape", "num_actions", "reset", "step"):
            if not hasattr(env, name):
                raise TypeError(f"the device loop needs a JAX env with `{name}` (e.g. from envs.jax.make), "
                                f"got {type(env).__name__}")
        self.config, self.env = config, env
        self.num_envs = n = rc.num_envs
        self.capacity_per_env = rc.replay_capacity // n
        if self.capacity_per_env < rc.seq_len:
            raise ValueError(f"replay_capacity {rc.replay_capacity} gives {self.capacity_per_env} steps per env, "
                             f"fewer than seq_len {rc.seq_len}: nothing could ever be sampled")
        self.obs_key, obs_shape, obs_dtype = _obs_layout(env, env_params)
        self.obs_spec = {self.obs_key: (obs_shape, obs_dtype)}
        self.action_spec = ActionSpec(int(env.num_actions), True)
        self.step_spec: dict[str, tuple[tuple[int, ...], str]] = {
            **self.obs_spec, "action": ((self.action_spec.dim,), "float32"), "reward": ((), "float32"),
            "is_first": ((), "bool"), "is_last": ((), "bool"), "is_terminal": ((), "bool")}
        self.schedule = make_schedule(rc.train_ratio, rc.batch_size, rc.seq_len, n,
                                      chunk_env_steps or rc.log_every)
        self.chunk = jax.jit(self._chunk, donate_argnums=0)

    # -- env stepping (one env; vmapped over N)

    def _env_reset(self, params: Any, key: PRNGKeyArray) -> tuple[Any, Any]:
        return self.env.reset(params, key)

    def _env_step(self, params: Any, state: Any, done: Bool[Array, ""], action: Int[Array, ""],
                  key: PRNGKeyArray) -> tuple[Any, Bool[Array, ""], Any]:
        """NEXT_STEP autoreset: after an episode's last step, the next step is a reset (the action
        is ignored). Both are computed and selected, which is cheap for these small envs."""
        step_key, reset_key = jax.random.split(key)
        stepped = self.env.step(params, state, action, step_key)
        fresh = self.env.reset(params, reset_key)
        state, timestep = jax.tree.map(lambda r, s: jnp.where(done, r, s), fresh, stepped)
        return state, jnp.asarray(timestep.terminated | timestep.truncated, bool), timestep

    def _to_step(self, timestep: Any, action: Float[Array, "n a"]) -> dict[str, Array]:
        """A batched env timestep and the action into it -> one stored step (the host convention)."""
        n = self.num_envs
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
        env_state, timestep = jax.jit(jax.vmap(self._env_reset, in_axes=(None, 0)))(
            env_params, jax.random.split(k_env, n))
        pending = self._to_step(timestep, jnp.zeros((n, self.action_spec.dim)))
        replay = replay_init(self.step_spec, n, self.capacity_per_env)
        carry = LoopCarry(agent, agent_lib.initial_carry(agent, n), env_state, jnp.zeros(n, bool), pending, replay,
                          jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32), jnp.zeros((), jnp.int32),
                          jnp.zeros((), jnp.int32), k_loop)
        # The chunk donates its carry, and a buffer may not be donated twice: eager ops can hand back
        # one array for two leaves (e.g. equal initial latents), so every leaf gets its own copy.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), carry)

    # -- the chunk

    def _collect(self, env_params: Any, c: LoopCarry, _: Any) -> tuple[LoopCarry, tuple[Array, Array, Array]]:
        """One vector step: store the pending step, act on it, step the envs (the host loop's step 1)."""
        replay = replay_add(c.replay, c.pending)
        key, k_act, k_env = jax.random.split(c.key, 3)
        obs = {self.obs_key: c.pending[self.obs_key], "is_first": c.pending["is_first"]}
        action, policy_carry = _policy(c.agent, c.policy_carry, obs, k_act)
        env_state, done, timestep = jax.vmap(self._env_step, in_axes=(None, 0, 0, 0, 0))(
            env_params, c.env_state, c.done, jnp.argmax(action, -1), jax.random.split(k_env, self.num_envs))
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

        def updates(agent: AgentState, key: PRNGKeyArray) -> tuple[AgentState, dict[str, Array]]:
            def one(agent, key):
                k_sample, k_train = jax.random.split(key)
                batch = replay_sample(c.replay, rc.batch_size, rc.seq_len, k_sample)
                return agent_lib._train(agent, batch, k_train)
            return jax.lax.scan(one, agent, jax.random.split(key, k))

        key, k_train = jax.random.split(c.key)
        shapes = jax.eval_shape(updates, c.agent, k_train)[1]
        skip = lambda agent, key: (agent, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        ready = (c.env_steps >= rc.train_start) & (replay_stored(c.replay) >= rc.seq_len)
        agent, metrics = jax.lax.cond(ready, updates, skip, c.agent, k_train)
        c = c._replace(agent=agent, key=key, updates=c.updates + jnp.where(ready, k, 0))
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


def run_on_device(config: Config, env: Any, env_params: Any, chunk_env_steps: int | None = None) -> dict[str, Any]:
    """Train in `config.run.logdir` for `config.run.steps` env steps (rounded up to whole chunks) with
    the device loop, logging `metrics.jsonl` (one line per chunk) and `scores.jsonl` as the host loop does.

    **Arguments:** see `DeviceLoop`. The logdir must not hold an earlier run: the device loop does not
    checkpoint or resume yet.

    **Returns:** a summary: env steps, updates, episodes, recent return, wall time, the first chunk's
    time (it includes compiling), env steps/s after the first chunk, the schedule, and the final
    agent `state` and `replay`.
    """
    rc = config.run
    logdir = Path(rc.logdir)
    if (logdir / "scores.jsonl").exists() and (logdir / "scores.jsonl").stat().st_size:
        raise ValueError(f"{logdir} already holds a run; the device loop cannot resume one (no checkpoints "
                         "yet): pass a new --run.logdir")
    if rc.eval_every:
        print("note: the device loop runs no evaluation episodes (run.eval_every is ignored)")
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "config.json").write_text(dumps(config))

    loop = DeviceLoop(config, env, env_params, chunk_env_steps)
    s = loop.schedule
    carry = loop.init(jax.random.PRNGKey(rc.seed), env_params)
    print(f"device loop: {agent_lib.count_params(carry.agent.params):,} parameters; chunk = {s.blocks} blocks x "
          f"({s.steps_per_block} steps x {s.num_envs} envs + {s.updates_per_block} updates) = "
          f"{s.env_steps_per_chunk} env steps; effective train_ratio "
          f"{s.effective_train_ratio(rc.batch_size, rc.seq_len):g} (asked {rc.train_ratio:g})")

    logger = RunLogger(logdir, rc.tensorboard)
    recent: collections.deque = collections.deque(maxlen=100)
    env_steps = updates = episodes = 0
    start = time.time()
    first_chunk_s, after_first = None, None
    try:
        while env_steps < rc.steps:
            chunk_start_steps = env_steps
            carry, out = loop.chunk(carry, env_params)
            out = jax.device_get(out)
            env_steps, updates = int(carry.env_steps), int(carry.updates)
            if first_chunk_s is None:
                first_chunk_s, after_first = time.time() - start, (time.time(), env_steps)
            # scores: vector step t of the chunk ends at env step start + (t + 1) * N
            for t, i in zip(*np.nonzero(out.is_last)):
                episodes += 1
                recent.append(float(out.episode_return[t, i]))
                logger.score(chunk_start_steps + (t + 1) * s.num_envs, "train", out.episode_return[t, i],
                             out.episode_length[t, i])
            elapsed = max(time.time() - start, 1e-9)
            values: dict[str, Any] = {"env_steps_per_s": env_steps / elapsed, "updates_per_s": updates / elapsed,
                                      "updates": updates, "episodes": episodes}
            if recent:
                values["train/return_recent"] = float(np.mean(recent))
            if out.trained.any():
                values.update({k: float(np.mean(v[out.trained])) for k, v in out.metrics.items()})
            logger.metrics(env_steps, values)
    finally:
        logger.close()
    elapsed = time.time() - start
    steady = None
    if after_first is not None and env_steps > after_first[1]:
        steady = (env_steps - after_first[1]) / max(time.time() - after_first[0], 1e-9)
    return {"env_steps": env_steps, "updates": updates, "episodes": episodes,
            "recent_return": float(np.mean(recent)) if recent else None, "seconds": elapsed,
            "first_chunk_seconds": first_chunk_s, "env_steps_per_s_after_first_chunk": steady,
            "schedule": s, "state": carry.agent, "replay": carry.replay}
