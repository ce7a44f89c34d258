"""The agent: `AgentState` (a PyTree) and the pure functions `init`, `policy` and `train`.

`train` is ONE compiled program: world-model loss, imagination from every posterior state,
actor and critic losses, one optimiser step and the slow-critic update. Its input state's buffers
are donated, so the caller must use the returned state and drop the old one.

Replay context (DreamerV3 2024): replay stores each step's posterior latent (`replay_latent` when
acting, the train step's posteriors afterwards) under `LATENT` keys. A batch that carries them is a
window of T + 1 steps whose first step is context only: training continues from its stored latent
instead of the initial state, and `train` returns the new latents of the T trained steps to write
back. A batch without them trains on all its steps from the initial state.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from worldmodels import sharding
from worldmodels.actor_critic import (Actor, ActorCriticConfig, Critic, ReturnNormState, lambda_return,
                                      return_norm_init, return_norm_scale, return_norm_update)
from worldmodels.dists import TwoHot, sg
from worldmodels.optim import OptimConfig, decay_mask, make_optimizer
from worldmodels.sequence.base import SequenceModel, State
from worldmodels.world_model import ObsSpec, WorldModel, WorldModelConfig
from worldmodels.world_model import open_loop_video as open_loop_video_of

# How often each jitted function has been traced (compiled); tests check it stays at one.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class AgentConfig:
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    actor_critic: ActorCriticConfig = field(default_factory=ActorCriticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The networks' compute dtype. DreamerV3 2024 computes in bfloat16 with float32 parameters, which
    # pays on GPUs and TPUs; parameters, optimiser, logits, distributions and losses stay float32.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # A run of `python -m experiments.train_world_model` whose world model a fresh agent starts from
    # (the host loop loads it; its world-model config must equal this one's)
    init_world_model: str = ""


@dataclass(frozen=True)
class ActionSpec:
    """`dim` actions: one-hot over `dim` choices if `discrete`, else a vector in [-1, 1]^dim."""

    dim: int
    discrete: bool


class AgentState(eqx.Module):
    config: AgentConfig = eqx.field(static=True)
    obs_spec: tuple = eqx.field(static=True)  # ((key, shape, dtype), ...)
    action_spec: ActionSpec = eqx.field(static=True)
    world_model: WorldModel
    actor: Actor
    critic: Critic
    slow_critic: Critic
    opt_state: optax.OptState
    retnorm: ReturnNormState
    step: Int[Array, ""]

    @property
    def params(self) -> tuple[WorldModel, Actor, Critic]:
        """What the optimiser trains."""
        return self.world_model, self.actor, self.critic


class PolicyCarry(NamedTuple):
    """What the policy carries between environment steps (per env)."""

    latent: State
    prev_action: Float[Array, "n a"]


def init(config: AgentConfig, obs_spec: ObsSpec, action_spec: ActionSpec, key: PRNGKeyArray) -> AgentState:
    """A freshly initialised agent for observations `obs_spec` (key -> (shape, dtype)) and actions."""
    if config.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown compute_dtype {config.compute_dtype!r}; valid: 'float32', 'bfloat16' "
                         "(--agent.compute-dtype)")
    spec = tuple((k, tuple(int(d) for d in s), str(jnp.dtype(t))) for k, (s, t) in sorted(obs_spec.items()))
    # Inside a trace (jit, vmap over seeds, eval_shape) the caller's transformation compiles it.
    state = (_init if isinstance(key, jax.core.Tracer) else _init_program())(config, spec, action_spec, key)
    if not all(eqx.is_array(x) for x in jax.tree.leaves(state)):
        raise TypeError("AgentState must hold only arrays as leaves (mark other fields static)")
    return state


def _init(config: AgentConfig, spec: tuple, action_spec: ActionSpec, key: PRNGKeyArray) -> AgentState:
    obs_spec = {k: (shape, dtype) for k, shape, dtype in spec}
    k1, k2, k3 = jax.random.split(key, 3)
    dtype = config.compute_dtype
    wm = WorldModel(config.world_model, obs_spec, action_spec.dim, key=k1, dtype=dtype)
    pdim = wm.dynamics.policy_feature_dim
    actor = Actor(pdim, action_spec.dim, action_spec.discrete, config.actor_critic, key=k2, dtype=dtype)
    critic = Critic(pdim, config.actor_critic, key=k3, dtype=dtype)
    params = (wm, actor, critic)
    opt_state = _optimizer(config.optim).init(eqx.filter(params, eqx.is_array))
    # The slow critic starts as a copy; jit outputs are distinct buffers, as the donating train step needs.
    return AgentState(config, spec, action_spec, wm, actor, critic, critic, opt_state, return_norm_init(),
                      jnp.zeros((), jnp.int32))


def _supported(options: dict[str, int | str]) -> dict[str, int | str] | None:
    """The XLA `options` this jaxlib knows (some are experimental and may go away; XLA's defaults
    then apply). Each is tried on a tiny program once."""
    supported = {}
    for name, value in options.items():
        try:
            jax.jit(jnp.negative, compiler_options={name: value}).lower(jnp.zeros(())).compile()
        except jax.errors.JaxRuntimeError:
            continue
        supported[name] = value
    return supported or None


# One compiled program instead of hundreds of eager initialiser calls. It runs once, so XLA's backend
# optimisations are switched off: that halves its compile time (parameters equal to ~1e-7). On CPU,
# XLA's older kernel emitter compiles its ~450 small kernels in about half the time of the MLIR one
# (parameters bit-identical for size1m; other backends ignore the option).
@functools.cache
def _init_program():
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    return jax.jit(_init, static_argnums=(0, 1, 2), compiler_options=_supported(options))


# On CPU, LLVM at -O2 instead of XLA's default -O3. (Running elementwise ops through the YNNPACK
# library as well, `xla_cpu_experimental_ynn_fusion_type`, would save another ~100 kernels of
# compiling, but in jaxlib 0.10.2 it miscomputes imagination, whose rewards and values come out ~0:
# tests/test_agent.py catches that.)
_CPU_OPTIONS = {"xla_backend_optimization_level": 2}


@functools.cache
def compiler_options(backend: str) -> dict[str, int | str] | None:
    """XLA options for the big programs built around `train` (the train step, the device loop's chunk).

    On CPU they cut the size1m and size12m train steps' compile time by ~15-20% at the same step
    speed (its time goes to the matmul library). Results differ at most by float32 rounding (none
    for size1m over 3 updates), which a flipped latent or action sample can magnify. Other backends
    keep their defaults.
    """
    return _supported(_CPU_OPTIONS) if backend == "cpu" else None


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def initial_carry(state: AgentState, num_envs: int) -> PolicyCarry:
    return PolicyCarry(state.world_model.dynamics.initial(num_envs), jnp.zeros((num_envs, state.action_spec.dim)))


@eqx.filter_jit
def policy(state: AgentState, carry: PolicyCarry, obs: Mapping[str, Array], key: PRNGKeyArray,
           greedy: bool = False) -> tuple[Float[Array, "n a"], PolicyCarry]:
    """One acting step for `n` envs.

    **Arguments:** `obs`: observation keys `[n, ...]` plus `is_first` `[n]` (the carry is reset
    where it is set); `greedy`: take the mode instead of sampling (static: two compiled versions).

    **Returns:** (actions `[n, A]`: one-hot if discrete, else in [-1, 1]; the next carry).
    """
    TRACE_COUNTS["policy"] += 1
    k1, k2 = jax.random.split(key)
    wm = state.world_model
    is_first = jnp.asarray(obs["is_first"], bool)
    embed = wm.encoder(obs)
    post, _ = wm.dynamics.obs_step(carry.latent, embed, carry.prev_action, is_first, k1)
    dist = state.actor(wm.dynamics.policy_features(post))
    action = sg(dist.mode() if greedy else dist.sample(k2))
    if state.action_spec.discrete:  # exact one-hot (the straight-through sum is one only up to rounding)
        action = jax.nn.one_hot(jnp.argmax(action, -1), state.action_spec.dim)
    else:
        action = jnp.clip(action, -1.0, 1.0)
    return action, PolicyCarry(post, action)


LATENT = "latent/"  # prefix of the replay-context keys in replay steps and batches


def _latent_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A sequence model's entry (or its spec) under the replay's `LATENT` keys."""
    return {LATENT + k: v for k, v in entry.items()}


def latent_spec(state: AgentState) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per step, key -> (shape, dtype) of the posterior latent that replay keeps for replay context."""
    return _latent_keys(state.world_model.dynamics.entry_spec())


@jax.jit
def replay_latent(state: AgentState, carry: PolicyCarry) -> dict[str, Array]:
    """The latent to store with the step `policy` just observed (its posterior in `carry`): `LATENT`
    keys, `[n, ...]`."""
    return _latent_keys(state.world_model.dynamics.entry(carry.latent))


def split_context(dynamics: SequenceModel, batch: Mapping[str, Array]
                  ) -> tuple[State | None, dict[str, Array]]:
    """(the state to start from, the steps to train on): with `LATENT` keys, the first step's stored
    latent and the remaining T steps; without, (None, the whole batch)."""
    latent = {k[len(LATENT):]: v for k, v in batch.items() if k.startswith(LATENT)}
    if not latent:
        return None, dict(batch)
    start = dynamics.from_entry({k: v[:, 0] for k, v in latent.items()})
    return sg(start), {k: v[:, 1:] for k, v in batch.items() if not k.startswith(LATENT)}


def _losses(params: tuple[WorldModel, Actor, Critic], state: AgentState, batch: Mapping[str, Array],
            key: PRNGKeyArray) -> tuple[Float[Array, ""], tuple[ReturnNormState, State, dict]]:
    wm, actor, critic = params
    ac = state.config.actor_critic
    k1, k2 = jax.random.split(key)
    start, batch = split_context(wm.dynamics, batch)
    b, t = batch["is_first"].shape
    if start is None:
        start = wm.dynamics.initial(b)
    gamma = 1.0 - 1.0 / ac.discount_horizon
    wm_loss, (post, metrics) = wm.loss(batch, start, k1, gamma if ac.contdisc else 1.0)

    # Imagination starts from every posterior state; only the actor's log-probs and the critic's
    # outputs carry gradients (REINFORCE; no gradient flows back through imagination).
    start = jax.tree.map(lambda x: sg(x.reshape(b * t, *x.shape[2:])), post)
    wm_fixed, actor_fixed = sg(wm), sg(actor)
    states, actions = wm_fixed.imagine(start, lambda f, k: actor_fixed(f).sample(k), ac.horizon, k2)
    feat = wm_fixed.dynamics.features(states)
    pfeat = wm_fixed.dynamics.policy_features(states)
    reward = wm_fixed.reward(feat[:, 1:]).mean()
    cont = wm_fixed.cont(feat).mean()
    if ac.contdisc:  # the predicted continues already include gamma
        disc = 1.0
    else:
        cont = cont.at[:, 0].set(1.0 - batch["is_terminal"].reshape(-1).astype(jnp.float32))
        disc = gamma

    value_dist = critic(pfeat)
    value = sg(value_dist.mean())
    ret = lambda_return(reward, disc * cont[:, 1:], value[:, 1:], ac.lam)
    weight = sg(jnp.cumprod(disc * cont, 1) / disc)[:, :-1]
    retnorm = return_norm_update(state.retnorm, ret, ac)
    scale = return_norm_scale(retnorm, ac)
    adv = (ret - value[:, :-1]) / scale

    dist = actor(pfeat[:, :-1])
    logp = dist.log_prob(sg(actions))
    entropy = dist.entropy()
    actor_loss = jnp.mean(weight * -(logp * sg(adv) + ac.entropy * entropy))

    slow_value = sg(state.slow_critic(pfeat[:, :-1]).mean())
    values = TwoHot(value_dist.logits[:, :-1], value_dist.bins)
    critic_loss = jnp.mean(weight * -(values.log_prob(sg(ret)) + ac.slow_reg * values.log_prob(slow_value)))

    total = wm_loss + ac.actor_scale * actor_loss + ac.critic_scale * critic_loss
    if ac.repval_scale:
        repval_loss, repval_metrics = _replay_value_loss(wm, critic, state, batch, post,
                                                         sg(ret[:, 0]).reshape(b, t), gamma)
        total = total + ac.repval_scale * repval_loss
        metrics.update({"loss/repval": repval_loss, **repval_metrics})
    metrics.update({"loss/world_model": wm_loss, "loss/actor": actor_loss, "loss/critic": critic_loss,
                    "actor/entropy": entropy.mean(), "imag/return": ret.mean(), "imag/reward": reward.mean(),
                    "imag/value": value.mean(), "imag/return_scale": scale, "imag/adv_std": jnp.std(adv)})
    return total, (retnorm, sg(post), metrics)


def _replay_value_loss(wm: WorldModel, critic: Critic, state: AgentState, batch: Mapping[str, Array],
                       post: State, boot: Float[Array, "b t"], gamma: float) -> tuple[Float[Array, ""], dict]:
    """Critic loss on the replayed sequences themselves (DreamerV3 2024, "repval").

    Targets are lambda returns over the real rewards, bootstrapped from the imagined return `boot`
    of each replayed step; the recursion stops at episode ends (`is_last`) and the bootstrap at
    terminal steps. With `repval_grad` its gradient also reaches the world model through `post`.
    **Returns:** (the loss, metrics: the critic's mean value on the replayed steps and their mean target).
    """
    ac = state.config.actor_critic
    pfeat = wm.dynamics.policy_features(post)
    if not ac.repval_grad:
        pfeat = sg(pfeat)
    reward = batch["reward"].astype(jnp.float32)
    term = batch["is_terminal"].astype(jnp.float32)
    last = batch["is_last"].astype(jnp.float32)
    ret = lambda_return(reward[:, 1:], gamma * (1.0 - term[:, 1:]), boot[:, 1:], ac.lam * (1.0 - last[:, 1:]))
    values = critic(pfeat[:, :-1])
    slow_value = sg(state.slow_critic(pfeat[:, :-1]).mean())
    loss = -(values.log_prob(sg(ret)) + ac.slow_reg * values.log_prob(slow_value))
    live = 1.0 - last[:, :-1]
    live_mean = lambda x: (x * live).sum() / jnp.maximum(live.sum(), 1.0)
    # the critic's value beside the real-reward return it learns (a critic that lags the policy shows here)
    metrics = {"replay/value": live_mean(sg(values.mean())), "replay/return": live_mean(ret)}
    return jnp.mean(live * loss), metrics


def _train(state: AgentState, batch: Mapping[str, Array], key: PRNGKeyArray
           ) -> tuple[AgentState, dict[str, Array], dict[str, Array]]:
    TRACE_COUNTS["train"] += 1
    optimizer = _optimizer(state.config.optim)
    grad_fn = eqx.filter_value_and_grad(_losses, has_aux=True)
    (loss, (retnorm, post, metrics)), grads = grad_fn(state.params, state, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = _scale_group_updates(updates, state.config.optim)
    wm, actor, critic = eqx.apply_updates(state.params, updates)
    rate = state.config.actor_critic.slow_rate
    slow = jax.tree.map(lambda s, c: (1 - rate) * s + rate * c, state.slow_critic, critic)
    grad_norm = optax.global_norm(grads)
    # The non-finite guard: an update whose loss or gradients are not finite is skipped, inside the
    # program (no host sync): the state stays as it was, and so do the replayed steps' stored latents.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics.update({"loss/total": loss, "grad_norm": grad_norm, "update_norm": optax.global_norm(updates),
                    "train/skipped": 1.0 - finite.astype(jnp.float32)})
    new = eqx.tree_at(lambda s: (s.world_model, s.actor, s.critic, s.slow_critic, s.opt_state, s.retnorm, s.step),
                      state, (wm, actor, critic, slow, opt_state, retnorm, state.step + 1))
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    latents = _latent_keys(state.world_model.dynamics.entry(post))
    stored = {k: batch[k][:, 1:] for k in latents if k in batch}
    if stored:
        latents = {k: jnp.where(finite, v, stored[k].astype(v.dtype)) for k, v in latents.items()}
    return new, metrics, latents


def _optimizer(config: OptimConfig):
    """The optimiser of the agent's (world model, actor, critic): weight decay, if any, on the world
    model only (R2I's model optimiser; its actor and critic optimisers have none)."""
    no_decay = lambda tree: jax.tree.map(lambda _: False, tree)
    return make_optimizer(config, lambda p: (decay_mask(p[0]), no_decay(p[1]), no_decay(p[2])))


def _scale_group_updates(updates: tuple, config: OptimConfig) -> tuple:
    """(world model, actor, critic) updates, the last two rescaled to their own learning rates."""
    wm, actor, critic = updates
    scale = lambda tree, lr: tree if lr is None else jax.tree.map(lambda u: u * (lr / config.lr), tree)
    return wm, scale(actor, config.actor_lr), scale(critic, config.critic_lr)


# Every leaf of AgentState is an array (static parts live in the tree structure), so plain jax.jit
# applies and avoids equinox's per-call Python partitioning (~70 ms per step for size1m).
@functools.cache
def _train_program(backend: str, mesh: Mesh | None = None, state_specs: tuple | None = None):
    if mesh is None:
        return jax.jit(_train, donate_argnums=0, compiler_options=compiler_options(backend))
    # Data parallel (GSPMD): the state and key on every device, the batch and the returned latents
    # split along B; XLA reduces the gradients across devices (an all-reduce in the program). With an
    # fsdp axis the state's big arrays are split over it (`state_specs`), and XLA gathers them.
    everywhere, split = sharding.replicated(mesh), sharding.split_batch(mesh)
    state = everywhere if state_specs is None else sharding.state_shardings(state_specs, mesh)
    return jax.jit(_train, donate_argnums=0, in_shardings=(state, split, everywhere),
                   out_shardings=(state, everywhere, split), compiler_options=compiler_options(backend))


def _program_for(state: AgentState, mesh: Mesh | None):
    fsdp = mesh is not None and sharding.FSDP in mesh.axis_names
    return _train_program(jax.default_backend(), mesh, sharding.state_specs(state, mesh) if fsdp else None)


def train(state: AgentState, batch: Mapping[str, Array], key: PRNGKeyArray, mesh: Mesh | None = None
          ) -> tuple[AgentState, dict[str, Array], dict[str, Array]]:
    """One update on a replayed batch (`[B, T, ...]` per key; see `WorldModel.loss`). With `LATENT`
    keys the batch has T + 1 steps and the first is context (see the module docstring).

    An update whose loss or gradients are not finite is skipped: the state comes back unchanged,
    the latents are the batch's own, and the metric `train/skipped` is 1 (else 0).

    **Returns:** (the new state, scalar metrics, the posterior latents of the T trained steps:
    `LATENT` keys `[B, T, ...]`, to write back to replay). The old `state`'s buffers are donated:
    use only the returned state afterwards (`copy_state` first to keep one).

    With a `mesh` (`worldmodels.sharding.make_mesh`) the update runs on all its devices: the batch
    (host arrays, or arrays split along B) is split over the mesh's devices, whose count must divide
    B; the key must be on every device (`sharding.put_replicated`) and the state laid out by
    `sharding.put_state` (on every device; with an fsdp axis its big arrays split), as the new state is.
    """
    return _program_for(state, mesh)(state, dict(batch), key)


def lower_train(state: AgentState, batch: Mapping[str, Array | jax.ShapeDtypeStruct],
                key: PRNGKeyArray | jax.ShapeDtypeStruct, mesh: Mesh | None = None) -> jax.stages.Lowered:
    """Trace and lower the train step for arguments of these shapes and dtypes; `.compile()` on the
    result then fills jit's cache, so that the first `train` call on such arguments only runs it.

    The arguments may be abstract (`jax.ShapeDtypeStruct` leaves, e.g. the state from
    `jax.eval_shape(functools.partial(init, config, obs_spec, action_spec), key)`). Lower in the thread
    that will call `train`, since thread-local JAX settings (e.g. `jax.default_device`) are part of
    jit's cache key; the compile may run in another thread (the training loop overlaps it with the
    first environment steps). Nothing is donated or run. `mesh`: as for `train`.
    """
    return _program_for(state, mesh).trace(state, dict(batch), key).lower()


def copy_state(state: AgentState) -> AgentState:
    """A copy with fresh buffers (the train step donates its input; keep this to compare against)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)


@eqx.filter_jit
def open_loop_video(state: AgentState, batch: Mapping[str, Array], key: PRNGKeyArray, context: int = 5
                    ) -> dict[str, UInt8[Array, "t bh w3 c"]]:
    """DreamerV3's "dreams" of the agent's world model: `world_model.open_loop_video` (which see)."""
    TRACE_COUNTS["open_loop_video"] += 1
    return open_loop_video_of(state.world_model, {k: v for k, v in batch.items() if not k.startswith(LATENT)},
                              key, context)
