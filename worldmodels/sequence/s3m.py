"""R2I's S3M: stacked diagonal SSM layers as the world model's sequence model.

Observing a sequence runs in parallel: the posterior reads the observation embedding only, so all
posterior samples come at once; the SSM inputs are built by teacher forcing (z_{t-1}, a_{t-1}) and
one parallel scan per layer gives every layer's state at every step. Acting and imagining step the
same recurrence one step at a time; both paths agree (tests check it), across episode starts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from worldmodels.dists import OneHotCategorical
from worldmodels.nn import MLP, DenseBlock, Linear, Normalize
from worldmodels.nn.layers import Norm
from worldmodels.sequence.base import (ModelConfig, SequenceModel, categorical_logits, reset_where, sample_steps, scale_action,
                                       teacher_forcing)
from worldmodels.sequence.rssm import categorical_kl_loss
from worldmodels.sequence.ssm import SSM, Discretization, as_complex, as_pair

PolicyInput = Literal["output", "hidden", "full"]


@dataclass(frozen=True)
class S3MConfig(ModelConfig):
    deter: int = 512  # width of the output state h
    width: int = 512  # H: the SSM layers' model width
    state_size: int = 128  # P: complex state size per layer
    layers: int = 3
    hippo_blocks: int = 1
    discretization: Discretization = "bilinear"
    hidden: int = 512  # units of the prior / posterior MLPs
    stoch: int = 32
    classes: int = 4
    img_layers: int = 2
    obs_layers: int = 1
    unimix: float = 0.01
    learned_initial: bool = True
    policy_input: PolicyInput = "full"  # what the actor and critic see: (h, z), (x, z) or (h, z, x)
    norm: Norm = "rms"


class S3MState(NamedTuple):
    deter: Float[Array, "... d"]  # output state h
    stoch: Float[Array, "... s k"]
    logits: Float[Array, "... s k"]
    hidden: Float[Array, "... l p 2"]  # every layer's complex SSM state as (real, imag)


class SSMBlock(eqx.Module):
    """x <- LayerNorm(x + GLU(GELU(SSM(x)))), GLU(v) = Dense(v) * sigmoid(Dense'(v))."""

    ssm: SSM
    glu_value: Linear
    glu_gate: Linear
    norm: Normalize

    def __init__(self, config: S3MConfig, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ssm = SSM(config.width, config.state_size, key=k1, blocks=config.hippo_blocks,
                       discretization=config.discretization)
        self.glu_value = Linear(config.width, config.width, key=k2)
        self.glu_gate = Linear(config.width, config.width, key=k3)
        self.norm = Normalize(config.width, "layer")

    def mix(self, u: Array, y: Array) -> Array:
        y = jax.nn.gelu(y)
        return self.norm(u + self.glu_value(y) * jax.nn.sigmoid(self.glu_gate(y)))


class S3M(SequenceModel):
    """The R2I sequence model (see module docstring). Initial state: learned (every layer's SSM state, and
    the latent as the prior's mode at h = 0, as R2I's) or zeros."""

    config: S3MConfig = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    in_proj: DenseBlock
    blocks: tuple[SSMBlock, ...]
    out_proj: Linear
    prior_net: MLP
    prior_out: Linear
    post_net: MLP
    post_out: Linear
    init_hidden: Float[Array, "l p 2"]

    def __init__(self, config: S3MConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray):
        c = config
        self.config, self.action_dim = c, action_dim
        k = jax.random.split(key, 7 + c.layers)
        flat = c.stoch * c.classes
        self.in_proj = DenseBlock(flat + action_dim, c.width, key=k[0], norm="layer")
        self.blocks = tuple(SSMBlock(c, key=k[7 + i]) for i in range(c.layers))
        self.out_proj = Linear(c.width, c.deter, key=k[1])
        self.prior_net = MLP(c.deter, c.hidden, c.img_layers, key=k[2], norm=c.norm)
        self.prior_out = Linear(c.hidden, flat, key=k[3])
        self.post_net = MLP(embed_dim, c.hidden, c.obs_layers, key=k[4], norm=c.norm)
        self.post_out = Linear(c.hidden, flat, key=k[5])
        self.init_hidden = jnp.zeros((c.layers, c.state_size, 2))

    # --- pieces -------------------------------------------------------------------------------
    def _logits(self, net: MLP, out: Linear, x: Array) -> Array:
        c = self.config  # float32 whatever the embedding's compute dtype
        return categorical_logits(out(net(x.astype(jnp.float32))), c.stoch, c.classes, c.unimix)

    def _initial_hidden(self) -> Array:
        # h_t is computed from x_t alone, so only the SSM states need a (learned) initial value.
        return self.init_hidden if self.config.learned_initial else jnp.zeros_like(self.init_hidden)

    def _initial_stoch(self) -> Float[Array, "s k"]:
        """The latent an episode starts from. Learned: as R2I, the prior's mode at the initial output
        state tanh(learned deter); that deter gets no gradient through the mode, so it stays at its
        zero init and the state is h = 0. Otherwise zeros."""
        c = self.config
        if not c.learned_initial:
            return jnp.zeros((c.stoch, c.classes))
        logits = self._logits(self.prior_net, self.prior_out, jnp.zeros(c.deter))
        return jax.lax.stop_gradient(jax.nn.one_hot(jnp.argmax(logits, -1), c.classes))

    def _inputs(self, stoch: Array, action: Array) -> Array:
        return self.in_proj(jnp.concatenate([stoch.reshape(*stoch.shape[:-2], -1), scale_action(action)], -1))

    def _step(self, state: S3MState, action: Array) -> tuple[Array, Array]:
        """One recurrent step from `state` with the action into the next step: (h [B, D], hidden [B, L, P, 2])."""
        u = self._inputs(state.stoch, action)
        hidden = []
        for i, block in enumerate(self.blocks):
            y, x = block.ssm.step(u, as_complex(state.hidden[:, i]))
            u = block.mix(u, y)
            hidden.append(as_pair(x))
        return jax.nn.silu(self.out_proj(u)), jnp.stack(hidden, 1)

    # --- interface ------------------------------------------------------------------------------
    def initial(self, batch_size: int) -> S3MState:
        c = self.config
        hidden = self._initial_hidden()
        stoch = jnp.broadcast_to(self._initial_stoch(), (batch_size, c.stoch, c.classes))
        return S3MState(jnp.zeros((batch_size, c.deter)), stoch, jnp.zeros((batch_size, c.stoch, c.classes)),
                        jnp.broadcast_to(hidden, (batch_size, *hidden.shape)))

    def img_step(self, state: S3MState, action: Float[Array, "b a"], key: PRNGKeyArray) -> S3MState:
        deter, hidden = self._step(state, action)
        logits = self._logits(self.prior_net, self.prior_out, deter)
        return S3MState(deter, OneHotCategorical(logits, 2).sample(key), logits, hidden)

    def obs_step(self, state: S3MState, embed: Float[Array, "b e"], action: Float[Array, "b a"],
                 is_first: Bool[Array, " b"], key: PRNGKeyArray) -> tuple[S3MState, S3MState]:
        state = reset_where(state, self.initial(is_first.shape[0]), is_first)
        action = jnp.where(is_first[:, None], 0.0, action)
        deter, hidden = self._step(state, action)
        prior_logits = self._logits(self.prior_net, self.prior_out, deter)
        post_logits = self._logits(self.post_net, self.post_out, embed)
        stoch = OneHotCategorical(post_logits, 2).sample(key)
        return S3MState(deter, stoch, post_logits, hidden), S3MState(deter, stoch, prior_logits, hidden)

    def observe(self, state: S3MState, embed: Float[Array, "b t e"], action: Float[Array, "b t a"],
                is_first: Bool[Array, "b t"], key: PRNGKeyArray) -> tuple[S3MState, S3MState]:
        b = is_first.shape[0]
        post_logits = self._logits(self.post_net, self.post_out, embed)
        stoch = sample_steps(post_logits, key)
        prev_stoch, action = teacher_forcing(state.stoch, stoch, action, is_first, self._initial_stoch())
        u = self._inputs(prev_stoch, action)
        init_hidden = self._initial_hidden()
        hidden = []
        for i, block in enumerate(self.blocks):
            x_init = jnp.broadcast_to(as_complex(init_hidden[i]), (b, self.config.state_size))
            y, xs = block.ssm(u, is_first, x_init, as_complex(state.hidden[:, i]))
            u = block.mix(u, y)
            hidden.append(as_pair(xs))
        deter = jax.nn.silu(self.out_proj(u))
        hidden = jnp.stack(hidden, 2)
        prior_logits = self._logits(self.prior_net, self.prior_out, deter)
        return S3MState(deter, stoch, post_logits, hidden), S3MState(deter, stoch, prior_logits, hidden)

    def features(self, state: S3MState) -> Float[Array, "... f"]:
        return jnp.concatenate([state.deter, state.stoch.reshape(*state.stoch.shape[:-2], -1)], -1)

    @property
    def feature_dim(self) -> int:
        return self.config.deter + self.config.stoch * self.config.classes

    @property
    def deter_dim(self) -> int:
        return self.config.deter

    def policy_features(self, state: S3MState) -> Float[Array, "... f"]:
        mode = self.config.policy_input
        z = state.stoch.reshape(*state.stoch.shape[:-2], -1)
        x = state.hidden.reshape(*state.hidden.shape[:-3], -1)  # all layers, real and imaginary parts
        if mode == "output":
            return jnp.concatenate([state.deter, z], -1)
        if mode == "hidden":
            return jnp.concatenate([z, x], -1)
        return jnp.concatenate([state.deter, z, x], -1)

    @property
    def policy_feature_dim(self) -> int:
        c = self.config
        z, x = c.stoch * c.classes, c.layers * c.state_size * 2
        return {"output": c.deter + z, "hidden": z + x, "full": c.deter + z + x}[c.policy_input]

    def kl_loss(self, post: S3MState, prior: S3MState, free: float) -> tuple[Array, Array]:
        return categorical_kl_loss(post.logits, prior.logits, free)
