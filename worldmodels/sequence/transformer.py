"""A causal Transformer with a fixed attention window W as the world model's sequence model.

Step t reads one token, x_t = Linear -> LayerNorm -> SiLU of (z_{t-1}, a_{t-1}) (the S3M's teacher
forcing), and `layers` pre-norm blocks (x + Attention(LN(x)), then x + FFN(LN(x))) with a final
LayerNorm give the output h_t, from which the prior predicts z_t; the posterior reads the
observation embedding only (as the S3M's), so `observe` samples every posterior first and then runs
attention over the whole sequence at once. Step t attends to the steps t - W + 1 ... t of its own
episode: the mask is causal, windowed and blocks attention across `is_first` (no step sees a
previous episode). Positions are rotary (RoPE) over the step's index within its episode, so
attention depends on relative positions only and no length limit is learned.

The state at step t is what acting and imagination need to continue from t: h_t, z_t, and per layer
a ring buffer of W rotated keys and values (slot `p mod W` holds episode step p), the episode step of
each slot (-1: empty) and of step t. `obs_step` / `img_step` write one slot and attend over the W
slots; no array grows, nothing retraces, and both paths agree with `observe` (tests check it).

Imagination starts from every replayed step, as the other models' does: `observe` gathers each
step's window from the sequence's keys and values (`[B, T, layers, W, width]` twice: 16 MiB at the
`transformer-bsuite-cpu` setting, 16 x 64, W 32, 2 layers, width 64), and each imagined step reads
its start's whole window. Measured on a 2-core CPU (README): the train step takes 313 ms there
against 201-215 ms for the other three models at the same parameter count, and 2-2.5x theirs at
B x T = 4096 (W 64, 3 layers of width 128: 805 MB of windows for the 4096 starts).

Replay context (a stored latent each replayed window continues from) is not kept for this model:
its state is the whole key/value window, 2 x layers x W x width floats a step (32 KiB at the CPU
preset, 133 KiB at the default size, where the other models store 0.1-2 KiB), so
`run.replay_context` must be off (`config.validate` says so; `--model transformer` sets it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from worldmodels.dists import OneHotCategorical
from worldmodels.nn import MLP, DenseBlock, Linear, Normalize
from worldmodels.nn.layers import Norm
from worldmodels.sequence.base import (ModelConfig, SequenceModel, categorical_logits, reset_where, sample_steps, scale_action,
                                       teacher_forcing)
from worldmodels.sequence.rssm import categorical_kl_loss

_MASKED = -1e9  # a masked score: its softmax weight is exactly 0 in float32


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    width: int = 256  # model width; the output h has this size
    layers: int = 2
    heads: int = 4  # must divide width; each head's size must be even (rotary pairs)
    ffn: int = 512  # feed-forward units
    window: int = 32  # W: steps each step attends to (itself and the W - 1 before it, same episode)
    hidden: int = 256  # units of the prior / posterior MLPs
    stoch: int = 32
    classes: int = 4
    img_layers: int = 2
    obs_layers: int = 1
    unimix: float = 0.01
    norm: Norm = "rms"  # of the prior / posterior MLPs (the blocks use LayerNorm)

    # Its state is the whole key/value window: replay does not keep it (module docstring).
    keeps_replay_context: ClassVar[bool] = False

    def window_problem(self, seq_len: int) -> str | None:
        if self.window > seq_len:
            return (f"--agent.world-model.sequence.transformer.window {self.window}: larger than the replayed window "
                    f"it learns from (--run.seq-len {seq_len}); use at most {seq_len}, or a longer --run.seq-len")
        return None


class TransformerState(NamedTuple):
    deter: Float[Array, "... d"]  # output h
    stoch: Float[Array, "... s k"]
    logits: Float[Array, "... s k"]
    keys: Float[Array, "... l w d"]  # per layer, the ring buffer of rotated keys
    values: Float[Array, "... l w d"]
    slot_step: Int[Array, "... w"]  # the episode step each slot holds; -1: empty
    step: Int[Array, "..."]  # this state's episode step; -1: before the first


def rotate(x: Float[Array, "... n h e"], position: Int[Array, "... n"]) -> Float[Array, "... n h e"]:
    """Rotary position embedding: pairs (x_2i, x_2i+1) of each head rotated by position / 10000^(2i/e)."""
    e = x.shape[-1]
    freq = 1.0 / (10000.0 ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    angle = position.astype(jnp.float32)[..., None, None] * freq  # [..., n, 1, e/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


def episode_steps(is_first: Bool[Array, "b t"], step: Int[Array, " b"]) -> tuple[Int[Array, "b t"], Int[Array, "b t"]]:
    """(each step's index within its episode, its episode's number within the sequence: 0 for the
    episode carried in at `step`, +1 at each `is_first`)."""
    t = is_first.shape[1]
    index = jnp.arange(t)
    last_start = jax.lax.cummax(jnp.where(is_first, index, -1), axis=1)
    position = jnp.where(last_start >= 0, index - last_start, step[:, None] + 1 + index)
    return position, jnp.cumsum(is_first, 1)


def attend(q: Float[Array, "b n h e"], k: Float[Array, "b m h e"], v: Float[Array, "b m h e"],
           allowed: Bool[Array, "b n m"]) -> Float[Array, "b n h e"]:
    scores = jnp.einsum("bnhe,bmhe->bhnm", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    scores = jnp.where(allowed[:, None], scores, _MASKED)
    return jnp.einsum("bhnm,bmhe->bnhe", jax.nn.softmax(scores, -1), v)


class Block(eqx.Module):
    """x <- x + Attention(LN(x)); x <- x + FFN(LN(x)) (pre-norm, GELU feed-forward)."""

    attn_norm: Normalize
    qkv: Linear
    out: Linear
    ffn_norm: Normalize
    ffn_in: Linear
    ffn_out: Linear
    heads: int = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        c = config
        k = jax.random.split(key, 4)
        self.heads = c.heads
        self.attn_norm = Normalize(c.width, "layer")
        self.qkv = Linear(c.width, 3 * c.width, key=k[0])
        self.out = Linear(c.width, c.width, key=k[1])
        self.ffn_norm = Normalize(c.width, "layer")
        self.ffn_in = Linear(c.width, c.ffn, key=k[2])
        self.ffn_out = Linear(c.ffn, c.width, key=k[3])

    def qkv_heads(self, x: Float[Array, "b n d"], position: Int[Array, "b n"]):
        """Rotated queries and keys and the values of `x`, `[b, n, heads, d / heads]` each."""
        q, k, v = jnp.split(self.qkv(self.attn_norm(x)), 3, -1)
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, -1)
        return rotate(split(q), position), rotate(split(k), position), split(v)

    def finish(self, x: Float[Array, "b n d"], attended: Float[Array, "b n h e"]) -> Float[Array, "b n d"]:
        x = x + self.out(attended.reshape(*attended.shape[:-2], -1))
        return x + self.ffn_out(jax.nn.gelu(self.ffn_in(self.ffn_norm(x))))


class Transformer(SequenceModel):
    """The causal Transformer sequence model (see module docstring). Initial state: empty windows."""

    config: TransformerConfig = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    in_proj: DenseBlock
    blocks: tuple[Block, ...]
    out_norm: Normalize
    prior_net: MLP
    prior_out: Linear
    post_net: MLP
    post_out: Linear

    def __init__(self, config: TransformerConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray):
        c = config
        if c.window < 1:
            raise ValueError(f"Transformer window must be >= 1 (got {c.window})")
        if c.width % c.heads or (c.width // c.heads) % 2:
            raise ValueError(f"Transformer width {c.width} must split into {c.heads} heads of even size")
        self.config, self.action_dim = c, action_dim
        k = jax.random.split(key, 5 + c.layers)
        flat = c.stoch * c.classes
        self.in_proj = DenseBlock(flat + action_dim, c.width, key=k[0], norm="layer")
        self.blocks = tuple(Block(c, key=k[5 + i]) for i in range(c.layers))
        self.out_norm = Normalize(c.width, "layer")
        self.prior_net = MLP(c.width, c.hidden, c.img_layers, key=k[1], norm=c.norm)
        self.prior_out = Linear(c.hidden, flat, key=k[2])
        self.post_net = MLP(embed_dim, c.hidden, c.obs_layers, key=k[3], norm=c.norm)
        self.post_out = Linear(c.hidden, flat, key=k[4])

    # --- pieces -------------------------------------------------------------------------------
    def _logits(self, net: MLP, out: Linear, x: Array) -> Array:
        c = self.config
        return categorical_logits(out(net(x.astype(jnp.float32))), c.stoch, c.classes, c.unimix)

    def _token(self, stoch: Array, action: Array) -> Array:
        return self.in_proj(jnp.concatenate([stoch.reshape(*stoch.shape[:-2], -1), scale_action(action)], -1))

    def _step(self, state: TransformerState, action: Array) -> TransformerState:
        """One step after `state` (the caller resets it at episode starts): the next state with its
        latent fields left from `state` (the caller samples them)."""
        w = self.config.window
        b = action.shape[0]
        rows = jnp.arange(b)
        position = state.step + 1
        slot = position % w
        # One slot a row written in place (a scatter), not the whole ring rewritten.
        slot_step = state.slot_step.at[rows, slot].set(position)
        allowed = (slot_step >= 0)[:, None]  # the ring holds only this episode's last W steps
        x = self._token(state.stoch, action)[:, None]
        keys, values = state.keys, state.values
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv_heads(x, position[:, None])
            keys = keys.at[rows, i, slot].set(k.reshape(b, -1))
            values = values.at[rows, i, slot].set(v.reshape(b, -1))
            split = lambda y: y[:, i].reshape(b, w, block.heads, -1)
            x = block.finish(x, attend(q, split(keys), split(values), allowed))
        deter = self.out_norm(x[:, 0])
        return TransformerState(deter, state.stoch, state.logits, keys, values, slot_step, position)

    def _windows(self, state: TransformerState, keys: Float[Array, "b t l d"], values: Float[Array, "b t l d"],
                 position: Int[Array, "b t"]) -> tuple[Array, Array, Array]:
        """Each step's ring buffers, gathered from the carried-in ones and the sequence's keys and
        values: slot s at step t holds the step of its episode at position p_t - ((p_t - s) mod W)."""
        t, w = position.shape[1], self.config.window
        back = (position[..., None] - jnp.arange(w)) % w  # [b, t, w]: steps back from t to slot s
        held = position[..., None] - back
        source = jnp.arange(t)[:, None] - back  # index into the sequence; < 0: the carried-in window
        valid = held >= 0
        index = jnp.where(source >= 0, w + source, jnp.arange(w))  # into [carried window; sequence]

        def gather(ring, seq):  # ring [b, l, w, d], seq [b, t, l, d] -> [b, t, l, w, d]
            both = jnp.concatenate([jnp.swapaxes(ring, 1, 2), seq], 1)  # [b, w + t, l, d]
            out = jax.vmap(lambda x, i: x[i])(both, index)  # [b, t, w, l, d]
            return jnp.where(valid[:, :, None, :, None], jnp.swapaxes(out, 2, 3), 0.0)

        return gather(state.keys, keys), gather(state.values, values), jnp.where(valid, held, -1)

    # --- interface ------------------------------------------------------------------------------
    def initial(self, batch_size: int) -> TransformerState:
        c = self.config
        latent = jnp.zeros((batch_size, c.stoch, c.classes))
        ring = jnp.zeros((batch_size, c.layers, c.window, c.width))
        return TransformerState(jnp.zeros((batch_size, c.width)), latent, latent, ring, ring,
                                jnp.full((batch_size, c.window), -1, jnp.int32), jnp.full((batch_size,), -1, jnp.int32))

    def img_step(self, state: TransformerState, action: Float[Array, "b a"], key: PRNGKeyArray) -> TransformerState:
        nxt = self._step(state, action)
        logits = self._logits(self.prior_net, self.prior_out, nxt.deter)
        return nxt._replace(stoch=OneHotCategorical(logits, 2).sample(key), logits=logits)

    def obs_step(self, state: TransformerState, embed: Float[Array, "b e"], action: Float[Array, "b a"],
                 is_first: Bool[Array, " b"], key: PRNGKeyArray) -> tuple[TransformerState, TransformerState]:
        state = reset_where(state, self.initial(is_first.shape[0]), is_first)
        action = jnp.where(is_first[:, None], 0.0, action)
        nxt = self._step(state, action)
        prior_logits = self._logits(self.prior_net, self.prior_out, nxt.deter)
        post_logits = self._logits(self.post_net, self.post_out, embed)
        stoch = OneHotCategorical(post_logits, 2).sample(key)
        return nxt._replace(stoch=stoch, logits=post_logits), nxt._replace(stoch=stoch, logits=prior_logits)

    def observe(self, state: TransformerState, embed: Float[Array, "b t e"], action: Float[Array, "b t a"],
                is_first: Bool[Array, "b t"], key: PRNGKeyArray) -> tuple[TransformerState, TransformerState]:
        c = self.config
        b, t = is_first.shape
        post_logits = self._logits(self.post_net, self.post_out, embed)
        stoch = sample_steps(post_logits, key)
        prev_stoch, action = teacher_forcing(state.stoch, stoch, action, is_first)  # initial latent: zeros

        position, episode = episode_steps(is_first, state.step)
        # Keys: the carried-in window (episode 0, empty slots excluded), then the sequence itself.
        key_position = jnp.concatenate([state.slot_step, position], 1)
        key_episode = jnp.concatenate([jnp.zeros_like(state.slot_step), episode], 1)
        key_valid = jnp.concatenate([state.slot_step >= 0, jnp.ones_like(is_first)], 1)
        qp, kp = position[:, :, None], key_position[:, None]
        allowed = ((episode[:, :, None] == key_episode[:, None]) & key_valid[:, None] & (kp <= qp) & (kp > qp - c.window))

        x = self._token(prev_stoch, action)
        seq_keys, seq_values = [], []
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv_heads(x, position)
            ring = lambda r: r[:, i].reshape(b, c.window, block.heads, -1)
            attended = attend(q, jnp.concatenate([ring(state.keys), k], 1), jnp.concatenate([ring(state.values), v], 1),
                              allowed)
            x = block.finish(x, attended)
            seq_keys.append(k.reshape(b, t, -1))
            seq_values.append(v.reshape(b, t, -1))
        deter = self.out_norm(x)
        ring_k, ring_v, slot_step = self._windows(state, jnp.stack(seq_keys, 2), jnp.stack(seq_values, 2), position)
        prior_logits = self._logits(self.prior_net, self.prior_out, deter)
        post = TransformerState(deter, stoch, post_logits, ring_k, ring_v, slot_step, position)
        return post, post._replace(logits=prior_logits)

    def features(self, state: TransformerState) -> Float[Array, "... f"]:
        return jnp.concatenate([state.deter, state.stoch.reshape(*state.stoch.shape[:-2], -1)], -1)

    @property
    def feature_dim(self) -> int:
        return self.config.width + self.config.stoch * self.config.classes

    @property
    def deter_dim(self) -> int:
        return self.config.width

    def kl_loss(self, post: TransformerState, prior: TransformerState, free: float) -> tuple[Array, Array]:
        return categorical_kl_loss(post.logits, prior.logits, free)
