"""Fast and Forgetful Memory (FFM; Morad et al., NeurIPS 2023) as the world model's sequence model.

The deterministic path is one FFM cell. From the input x_t (the previous latent and action, through
Linear -> LayerNorm -> SiLU) a Linear gives `[u~, thru, g]` (widths m, D, m + D); the gates
`p = sigmoid(g[:m])`, `q = sigmoid(g[m:])` give the input `u_t = u~ * p`, and the aggregator keeps
a complex memory `S [m, c]` (m decaying traces, c phase contexts):

    S_t = gamma * S_{t-1} + u_t 1_c^T,      gamma_jk = exp(a_j + i b_k),  a_j <= -1e-8
    h_t = LN(Linear([Re S_t; Im S_t])) * q + thru * (1 - q)         (LayerNorm without scale or bias)

`a` is a learned decay per trace, `b` a learned phase per context. The categorical latents, prior
and posterior are the S3M's: the posterior reads the observation embedding only, so `observe`
samples every posterior at once and runs one `jax.lax.associative_scan` over T (log depth). Acting
and imagining step the same recurrence one step at a time; both paths agree (tests check it).

Resets are exact wherever they fall: each step is an element (input, relative time, reset flag),
the map S -> (1 - r) gamma^t S + input, and two elements combine with their reset flags OR-ed
(`combine`), which is associative (the original JAX port kept only the later flag, which is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Complex, Float, PRNGKeyArray

from worldmodels.dists import OneHotCategorical
from worldmodels.nn import MLP, DenseBlock, Linear
from worldmodels.nn.layers import Norm
from worldmodels.sequence.base import (ModelConfig, SequenceModel, categorical_logits, reset_where, sample_steps, scale_action,
                                       teacher_forcing)
from worldmodels.sequence.rssm import categorical_kl_loss
from worldmodels.sequence.ssm import as_complex, as_pair

PolicyInput = Literal["output", "hidden", "full"]


@dataclass(frozen=True)
class FFMConfig(ModelConfig):
    deter: int = 256  # D: width of the output h (and of the cell's skip path `thru`)
    width: int = 256  # the input projection's width
    memory: int = 32  # m: decaying traces
    contexts: int = 4  # c: phase contexts per trace (the memory holds 2 m c reals)
    min_period: int = 1  # the fastest trace forgets to 1% in min_period steps (init)
    max_period: int = 1024  # the slowest to 1% in max_period steps; phase periods span [min, max] (init)
    hidden: int = 256  # units of the prior / posterior MLPs
    stoch: int = 32
    classes: int = 4
    img_layers: int = 2
    obs_layers: int = 1
    unimix: float = 0.01
    policy_input: PolicyInput = "full"  # what the actor and critic see: (h, z), (S, z) or (h, z, S)
    norm: Norm = "rms"


class FFMState(NamedTuple):
    deter: Float[Array, "... d"]  # output h
    stoch: Float[Array, "... s k"]
    logits: Float[Array, "... s k"]
    memory: Float[Array, "... m c 2"]  # the complex memory S as (real, imag)


Element = tuple[Complex[Array, "... m c"], Float[Array, "... 1 1"], Float[Array, "... 1 1"]]


def combine(log_gamma: Complex[Array, "m c"], earlier: Element, later: Element) -> Element:
    """Compose two scan elements, `later` after `earlier`.

    An element (S, t, r) is the map X -> (1 - r) gamma^t X + S over t steps (r = 1: a reset inside
    them, so X is forgotten). The composition is (S_l + (1 - r_l) gamma^{t_l} S_e, t_e + t_l,
    r_e OR r_l): associative, since (1 - (r_e OR r_l)) gamma^{t_e + t_l} = (1 - r_e) gamma^{t_e}
    (1 - r_l) gamma^{t_l}.
    """
    s_e, t_e, r_e = earlier
    s_l, t_l, r_l = later
    decay = jnp.exp(t_l * log_gamma)
    return s_l + (1.0 - r_l) * decay * s_e, t_e + t_l, jnp.maximum(r_e, r_l)


def aggregate_parallel(log_gamma: Complex[Array, "m c"], inputs: Float[Array, "b t m"], is_first: Bool[Array, "b t"],
                       memory: Complex[Array, "b m c"]) -> Complex[Array, "b t m c"]:
    """All memories of `S_t = gamma * (0 if is_first_t else S_{t-1}) + u_t`, starting after `memory`,
    by one associative scan over T."""
    b, t, m = inputs.shape
    c = log_gamma.shape[-1]
    reset = is_first.astype(inputs.dtype)[..., None, None]
    s = jnp.broadcast_to(inputs[..., None], (b, t, m, c)).astype(log_gamma.dtype)
    # The carried-in memory enters through the first element (dropped there if it resets).
    s = s.at[:, 0].add((1.0 - reset[:, 0]) * jnp.exp(log_gamma) * memory)
    elements = (s, jnp.ones_like(reset), reset)
    out, _, _ = jax.lax.associative_scan(lambda e, l: combine(log_gamma, e, l), elements, axis=1)
    return out


def aggregate_step(log_gamma: Complex[Array, "m c"], inputs: Float[Array, "b m"],
                   memory: Complex[Array, "b m c"]) -> Complex[Array, "b m c"]:
    """One step of the recurrence (the caller resets `memory` at episode starts)."""
    return jnp.exp(log_gamma) * memory + inputs[..., None]


def layer_norm(x: Float[Array, "... d"], eps: float = 1e-5) -> Float[Array, "... d"]:
    """LayerNorm over the last axis without learned scale or offset (FFM's output norm)."""
    mean = jnp.mean(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + eps)


class FFM(SequenceModel):
    """The FFM sequence model (see module docstring). Initial state: zeros."""

    config: FFMConfig = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    in_proj: DenseBlock
    cell_in: Linear
    cell_out: Linear
    decay: Float[Array, " m"]  # a (clamped to <= -1e-8 when used)
    phase: Float[Array, " c"]  # b
    prior_net: MLP
    prior_out: Linear
    post_net: MLP
    post_out: Linear

    def __init__(self, config: FFMConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray):
        c = config
        if c.memory < 1 or c.contexts < 1:
            raise ValueError(f"FFM needs memory >= 1 and contexts >= 1 (got {c.memory}, {c.contexts})")
        self.config, self.action_dim = c, action_dim
        k = jax.random.split(key, 7)
        flat = c.stoch * c.classes
        self.in_proj = DenseBlock(flat + action_dim, c.width, key=k[0], norm="layer")
        self.cell_in = Linear(c.width, 2 * c.memory + 2 * c.deter, key=k[1])
        self.cell_out = Linear(2 * c.memory * c.contexts, c.deter, key=k[2])
        forgotten = math.log(0.01)  # each trace's decay reaches 1% after its period
        self.decay = jnp.linspace(forgotten / c.min_period, forgotten / c.max_period, c.memory)
        self.phase = 2 * jnp.pi / jnp.linspace(c.min_period, c.max_period, c.contexts)
        self.prior_net = MLP(c.deter, c.hidden, c.img_layers, key=k[3], norm=c.norm)
        self.prior_out = Linear(c.hidden, flat, key=k[4])
        self.post_net = MLP(embed_dim, c.hidden, c.obs_layers, key=k[5], norm=c.norm)
        self.post_out = Linear(c.hidden, flat, key=k[6])

    # --- pieces -------------------------------------------------------------------------------
    def log_gamma(self) -> Complex[Array, "m c"]:
        a = jnp.minimum(self.decay, -1e-8)
        return jax.lax.complex(jnp.broadcast_to(a[:, None], (a.shape[0], self.phase.shape[0])),
                               jnp.broadcast_to(self.phase[None], (a.shape[0], self.phase.shape[0])))

    def _logits(self, net: MLP, out: Linear, x: Array) -> Array:
        c = self.config
        return categorical_logits(out(net(x.astype(jnp.float32))), c.stoch, c.classes, c.unimix)

    def _cell_inputs(self, stoch: Array, action: Array) -> tuple[Array, Array, Array]:
        """(u [..., m], thru [..., D], q [..., D]) from the previous latent and the action into the step."""
        c = self.config
        x = self.in_proj(jnp.concatenate([stoch.reshape(*stoch.shape[:-2], -1), scale_action(action)], -1))
        pre, thru, gate = jnp.split(self.cell_in(x), [c.memory, c.memory + c.deter], -1)
        p, q = jnp.split(jax.nn.sigmoid(gate), [c.memory], -1)
        return pre * p, thru, q

    def _output(self, memory: Complex[Array, "... m c"], thru: Array, q: Array) -> Float[Array, "... d"]:
        flat = jnp.concatenate([jnp.real(memory), jnp.imag(memory)], -1).reshape(*memory.shape[:-2], -1)
        return layer_norm(self.cell_out(flat)) * q + thru * (1.0 - q)

    def _step(self, state: FFMState, action: Array) -> tuple[Array, Array]:
        u, thru, q = self._cell_inputs(state.stoch, action)
        memory = aggregate_step(self.log_gamma(), u, as_complex(state.memory))
        return self._output(memory, thru, q), as_pair(memory)

    # --- interface ------------------------------------------------------------------------------
    def initial(self, batch_size: int) -> FFMState:
        c = self.config
        return FFMState(jnp.zeros((batch_size, c.deter)), jnp.zeros((batch_size, c.stoch, c.classes)),
                        jnp.zeros((batch_size, c.stoch, c.classes)),
                        jnp.zeros((batch_size, c.memory, c.contexts, 2)))

    def img_step(self, state: FFMState, action: Float[Array, "b a"], key: PRNGKeyArray) -> FFMState:
        deter, memory = self._step(state, action)
        logits = self._logits(self.prior_net, self.prior_out, deter)
        return FFMState(deter, OneHotCategorical(logits, 2).sample(key), logits, memory)

    def obs_step(self, state: FFMState, embed: Float[Array, "b e"], action: Float[Array, "b a"],
                 is_first: Bool[Array, " b"], key: PRNGKeyArray) -> tuple[FFMState, FFMState]:
        state = reset_where(state, self.initial(is_first.shape[0]), is_first)
        action = jnp.where(is_first[:, None], 0.0, action)
        deter, memory = self._step(state, action)
        prior_logits = self._logits(self.prior_net, self.prior_out, deter)
        post_logits = self._logits(self.post_net, self.post_out, embed)
        stoch = OneHotCategorical(post_logits, 2).sample(key)
        return FFMState(deter, stoch, post_logits, memory), FFMState(deter, stoch, prior_logits, memory)

    def observe(self, state: FFMState, embed: Float[Array, "b t e"], action: Float[Array, "b t a"],
                is_first: Bool[Array, "b t"], key: PRNGKeyArray) -> tuple[FFMState, FFMState]:
        post_logits = self._logits(self.post_net, self.post_out, embed)
        stoch = sample_steps(post_logits, key)
        prev_stoch, action = teacher_forcing(state.stoch, stoch, action, is_first)  # initial latent: zeros
        u, thru, q = self._cell_inputs(prev_stoch, action)
        memory = aggregate_parallel(self.log_gamma(), u, is_first, as_complex(state.memory))
        deter = self._output(memory, thru, q)
        memory = as_pair(memory)
        prior_logits = self._logits(self.prior_net, self.prior_out, deter)
        return FFMState(deter, stoch, post_logits, memory), FFMState(deter, stoch, prior_logits, memory)

    def features(self, state: FFMState) -> Float[Array, "... f"]:
        return jnp.concatenate([state.deter, state.stoch.reshape(*state.stoch.shape[:-2], -1)], -1)

    @property
    def feature_dim(self) -> int:
        return self.config.deter + self.config.stoch * self.config.classes

    @property
    def deter_dim(self) -> int:
        return self.config.deter

    def policy_features(self, state: FFMState) -> Float[Array, "... f"]:
        mode = self.config.policy_input
        z = state.stoch.reshape(*state.stoch.shape[:-2], -1)
        s = state.memory.reshape(*state.memory.shape[:-3], -1)  # every trace and context, real and imaginary
        if mode == "output":
            return jnp.concatenate([state.deter, z], -1)
        if mode == "hidden":
            return jnp.concatenate([z, s], -1)
        return jnp.concatenate([state.deter, z, s], -1)

    @property
    def policy_feature_dim(self) -> int:
        c = self.config
        z, s = c.stoch * c.classes, 2 * c.memory * c.contexts
        return {"output": c.deter + z, "hidden": z + s, "full": c.deter + z + s}[c.policy_input]

    def kl_loss(self, post: FFMState, prior: FFMState, free: float) -> tuple[Array, Array]:
        return categorical_kl_loss(post.logits, prior.logits, free)
