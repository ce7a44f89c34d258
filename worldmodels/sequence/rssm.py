"""DreamerV3's recurrent state-space model (2024 variant): block-diagonal GRU + categorical latents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from worldmodels.dists import OneHotCategorical, sg
from worldmodels.nn import MLP, BlockLinear, DenseBlock, Linear, Normalize
from worldmodels.nn.layers import Norm
from worldmodels.sequence.base import ModelConfig, SequenceModel, reset_where, scale_action


@dataclass(frozen=True)
class RSSMConfig(ModelConfig):
    deter: int = 512
    hidden: int = 64
    stoch: int = 32
    classes: int = 4
    blocks: int = 8
    img_layers: int = 2
    obs_layers: int = 1
    unimix: float = 0.01
    norm: Norm = "rms"
    # Initial scale of the GRU's block layers: 1 / sqrt(whole input) as the reference, or "block":
    # 1 / sqrt(one block's input), sqrt(blocks) larger (what dreamer-bsuite-cpu was measured with).
    block_fan_in: Literal["input", "block"] = "input"


class RSSMState(NamedTuple):
    deter: Float[Array, "... d"]
    stoch: Float[Array, "... s k"]
    logits: Float[Array, "... s k"]


class RSSM(SequenceModel):
    """h_t = GRU(h_{t-1}, z_{t-1}, a_{t-1}); prior p(z_t | h_t); posterior q(z_t | h_t, e_t).

    Each of (h, z, a) is projected by Linear -> norm -> SiLU, then a GRU whose matrices are
    block-diagonal over `blocks` groups updates h. Initial state: zeros.

    `dtype` is the compute dtype: the layers, deter and stoch use it (DreamerV3 2024 uses bfloat16);
    logits and distributions are float32.
    """

    config: RSSMConfig = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    in_deter: DenseBlock
    in_stoch: DenseBlock
    in_action: DenseBlock
    hidden_layer: BlockLinear
    hidden_norm: Normalize
    gates: BlockLinear
    prior_net: MLP
    prior_out: Linear
    post_net: MLP
    post_out: Linear

    def __init__(self, config: RSSMConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray,
                 dtype: str = "float32"):
        c = config
        self.dtype = dtype
        if c.obs_layers < 1:
            raise ValueError("RSSM obs_layers must be >= 1 (the posterior reads [deter, embed] through an MLP)")
        if c.deter % c.blocks:
            raise ValueError(f"RSSM deter={c.deter} must be divisible by blocks={c.blocks}")
        self.config = c
        self.action_dim = action_dim
        k = jax.random.split(key, 9)
        flat = c.stoch * c.classes
        self.in_deter = DenseBlock(c.deter, c.hidden, key=k[0], norm=c.norm)
        self.in_stoch = DenseBlock(flat, c.hidden, key=k[1], norm=c.norm)
        self.in_action = DenseBlock(action_dim, c.hidden, key=k[2], norm=c.norm)
        group_in = c.deter // c.blocks + 3 * c.hidden
        per_block = c.block_fan_in == "block"
        self.hidden_layer = BlockLinear(c.blocks * group_in, c.deter, c.blocks, key=k[3], per_block_fan_in=per_block)
        self.hidden_norm = Normalize(c.deter, c.norm)  # over the whole deter vector, as the reference
        self.gates = BlockLinear(c.deter, 3 * c.deter, c.blocks, key=k[4], per_block_fan_in=per_block)
        self.prior_net = MLP(c.deter, c.hidden, c.img_layers, key=k[5], norm=c.norm)
        self.prior_out = Linear(c.hidden, flat, key=k[6])
        self.post_net = MLP(c.deter + embed_dim, c.hidden, c.obs_layers, key=k[7], norm=c.norm)
        self.post_out = Linear(c.hidden, flat, key=k[8])

    # --- pieces -------------------------------------------------------------------------------
    def _dist(self, logits: Array) -> OneHotCategorical:
        logits = logits.astype(jnp.float32).reshape(*logits.shape[:-1], self.config.stoch, self.config.classes)
        return OneHotCategorical.from_logits(logits, self.config.unimix, event_dims=2)

    def _action_input(self, action: Array) -> Array:
        """The GRU's action branch. It does not depend on the recurrent state, so `observe` computes it
        for a whole sequence at once instead of inside the scan."""
        return self.in_action(scale_action(action).astype(self.dtype))

    def _embed_input(self, embed: Array) -> Array:
        """The embedding's share of the posterior's first layer (its input is [deter, embed]); like
        `_action_input`, computed for a whole sequence at once by `observe`."""
        weight = self.post_net.blocks[0].linear.weight[self.config.deter:]
        return embed.astype(self.dtype) @ weight.astype(self.dtype)

    def _posterior_logits(self, deter: Array, embed_input: Array) -> Array:
        first, *rest = self.post_net.blocks
        weight, bias = first.linear.weight[:self.config.deter].astype(self.dtype), first.linear.bias.astype(self.dtype)
        x = deter @ weight + embed_input + bias
        x = jax.nn.silu(first.norm(x))
        for block in rest:
            x = block(x)
        return self._dist(self.post_out(x)).logits

    def _gru(self, deter: Array, stoch: Array, action_input: Array) -> Array:
        c = self.config
        g, per_group = c.blocks, c.deter // c.blocks
        batch = deter.shape[:-1]
        x = jnp.concatenate([self.in_deter(deter), self.in_stoch(stoch.reshape(*batch, -1)), action_input], -1)
        x = x.reshape(-1, x.shape[-1])
        # Work group-major ([G, N, deter / G]): each group's matmul is then one contiguous batched
        # matmul and the gate nonlinearities read contiguous memory (about 2x faster on CPU than
        # contracting with the group axis in the middle). Each group's input is [its slice of h, x];
        # the x rows of all groups form one dense [3 * hidden, deter] matrix, so x is multiplied once
        # instead of being broadcast to every group.
        h = jnp.moveaxis(deter.reshape(-1, g, per_group), 1, 0)
        w = self.hidden_layer.weight.astype(self.dtype)
        w_shared = jnp.moveaxis(w[:, per_group:], 0, 1).reshape(x.shape[-1], -1)
        shared = jnp.moveaxis((x @ w_shared).reshape(-1, g, per_group), 1, 0)
        y = (jnp.einsum("gni,gio->gno", h, w[:, :per_group]) + shared
             + self.hidden_layer.bias.astype(self.dtype).reshape(g, 1, -1))
        y = jax.nn.silu(self.hidden_norm.grouped(y))
        gates = (jnp.einsum("gni,gio->gno", y, self.gates.weight.astype(self.dtype))
                 + self.gates.bias.astype(self.dtype).reshape(g, 1, -1))
        reset, cand, update = jnp.split(gates, 3, axis=-1)
        reset = jax.nn.sigmoid(reset)
        cand = jnp.tanh(reset * cand)
        update = jax.nn.sigmoid(update - 1.0)
        h = update * cand + (1.0 - update) * h
        return jnp.moveaxis(h, 0, 1).reshape(*batch, -1)

    def _prior_logits(self, deter: Array) -> Array:
        return self._dist(self.prior_out(self.prior_net(deter))).logits

    # --- interface ------------------------------------------------------------------------------
    def initial(self, batch_size: int) -> RSSMState:
        c = self.config
        latent = (batch_size, c.stoch, c.classes)
        return RSSMState(jnp.zeros((batch_size, c.deter), self.dtype), jnp.zeros(latent, self.dtype), jnp.zeros(latent))

    def img_step(self, state: RSSMState, action: Float[Array, "b a"], key: PRNGKeyArray) -> RSSMState:
        deter = self._gru(state.deter, state.stoch, self._action_input(action))
        logits = self._prior_logits(deter)
        stoch = OneHotCategorical(logits, 2).sample(key).astype(self.dtype)
        return RSSMState(deter, stoch, logits)

    def obs_step(self, state: RSSMState, embed: Float[Array, "b e"], action: Float[Array, "b a"],
                 is_first: Bool[Array, " b"], key: PRNGKeyArray) -> tuple[RSSMState, RSSMState]:
        action = jnp.where(is_first[:, None], 0.0, action)
        return self._obs_step(state, self._embed_input(embed), self._action_input(action), is_first, key)

    def _obs_step(self, state: RSSMState, embed_input: Array, action_input: Array, is_first: Array,
                  key: PRNGKeyArray) -> tuple[RSSMState, RSSMState]:
        state = reset_where(state, self.initial(is_first.shape[0]), is_first)
        deter = self._gru(state.deter, state.stoch, action_input)
        prior_logits = self._prior_logits(deter)
        post_logits = self._posterior_logits(deter, embed_input)
        stoch = OneHotCategorical(post_logits, 2).sample(key).astype(self.dtype)
        # The prior's sample is never used for training, so it is not drawn; its stoch slot holds
        # the posterior sample to keep both states the same PyTree.
        return RSSMState(deter, stoch, post_logits), RSSMState(deter, stoch, prior_logits)

    def observe(self, state: RSSMState, embed: Float[Array, "b t e"], action: Float[Array, "b t a"],
                is_first: Bool[Array, "b t"], key: PRNGKeyArray) -> tuple[RSSMState, RSSMState]:
        keys = jax.random.split(key, embed.shape[1])
        action = jnp.where(is_first[..., None], 0.0, action)
        embed_input, action_input = self._embed_input(embed), self._action_input(action)

        def step(carry, inputs):
            e, a, f, k = inputs
            post, prior = self._obs_step(carry, e, a, f, k)
            return post, (post, prior)

        swap = lambda x: jnp.swapaxes(x, 0, 1)
        _, (post, prior) = jax.lax.scan(step, state, (swap(embed_input), swap(action_input), swap(is_first), keys))
        return jax.tree.map(swap, post), jax.tree.map(swap, prior)

    def features(self, state: RSSMState) -> Float[Array, "... f"]:
        return jnp.concatenate([state.deter, state.stoch.reshape(*state.stoch.shape[:-2], -1)], -1)

    @property
    def feature_dim(self) -> int:
        return self.config.deter + self.config.stoch * self.config.classes

    @property
    def deter_dim(self) -> int:
        return self.config.deter

    def entry(self, state: RSSMState) -> dict[str, Array]:
        """deter as float16 (|h| < 1, so rounding moves it by at most 2^-12; half the memory) and the
        one-hot stoch as class indices (the same sample, without the straight-through sum's 1-ulp
        rounding). The logits are not needed to continue."""
        index = jnp.uint8 if self.config.classes <= 256 else jnp.int32
        return {"deter": state.deter.astype(jnp.float16), "stoch": jnp.argmax(state.stoch, -1).astype(index)}

    def from_entry(self, entry: dict[str, Array]) -> RSSMState:
        stoch = jax.nn.one_hot(entry["stoch"], self.config.classes, dtype=self.dtype)
        return RSSMState(entry["deter"].astype(self.dtype), stoch, jnp.zeros(stoch.shape))

    def kl_loss(self, post: RSSMState, prior: RSSMState, free: float) -> tuple[Array, Array]:
        return categorical_kl_loss(post.logits, prior.logits, free)


def categorical_kl_loss(post_logits: Float[Array, "... s k"], prior_logits: Float[Array, "... s k"],
                        free: float) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """KL balancing with free bits: dyn = max(free, KL(sg(post) || prior)) trains the prior,
    rep = max(free, KL(post || sg(prior))) trains the posterior; KLs summed over the latents."""
    dyn = OneHotCategorical(sg(post_logits), 2).kl(OneHotCategorical(prior_logits, 2))
    rep = OneHotCategorical(post_logits, 2).kl(OneHotCategorical(sg(prior_logits), 2))
    return jnp.maximum(dyn, free), jnp.maximum(rep, free)
