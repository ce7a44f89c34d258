"""The world model: encoder + sequence model + decoder / reward / continue heads, its loss, `imagine`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from worldmodels.dists import Bernoulli, TwoHot, sg, symexp_bins, symlog
from worldmodels.nn import MLP, ConvDecoder, ConvEncoder, Linear
from worldmodels.nn.layers import Norm
from worldmodels.sequence import SequenceConfig, make_sequence_model
from worldmodels.sequence.base import SequenceModel, State

# Observation spec: key -> (shape, dtype). Images are uint8 [H, W, C]; vectors are float32 [D].
ObsSpec = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class WorldModelConfig:
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    units: int = 64  # width of the vector encoder/decoder MLPs (and of the heads, unless head_units)
    layers: int = 3  # layers of the vector encoder/decoder MLPs
    head_layers: int = 1  # layers of the reward and continue heads
    head_units: int = 0  # width of the reward and continue heads; 0: `units`
    cnn_depth: int = 4
    # The image decoder's first layer (DreamerV3 2024's default): the deterministic state through this
    # many block-diagonal blocks plus the stochastic latent through a 2-layer MLP of 2 x `units`.
    # 0: one dense Linear from all the features (DreamerV3 2023, R2I).
    decoder_blocks: int = 8
    image_keys: str = r".*"  # regex over observation keys: which images to encode and decode
    vector_keys: str = r".*"  # regex over observation keys: which vectors to encode and decode
    bins: int = 255
    free_nats: float = 1.0
    dyn_scale: float = 1.0
    rep_scale: float = 0.1
    rec_scale: float = 1.0
    reward_scale: float = 1.0
    cont_scale: float = 1.0
    norm: Norm = "rms"


def split_keys(spec: ObsSpec, config: WorldModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(image keys, vector keys) of an observation spec that the config selects, sorted."""
    images = tuple(k for k in sorted(spec) if len(spec[k][0]) == 3 and re.fullmatch(config.image_keys, k))
    vectors = tuple(k for k in sorted(spec) if len(spec[k][0]) == 1 and re.fullmatch(config.vector_keys, k))
    if not images and not vectors:
        raise ValueError(f"no observation key to model: spec {dict(spec)} has no [H, W, C] image matching "
                         f"{config.image_keys!r} nor [D] vector matching {config.vector_keys!r}")
    return images, vectors


class Encoder(eqx.Module):
    """Dict observation `[..., *shape]` per key -> embedding `[..., E]`."""

    image_keys: tuple[str, ...] = eqx.field(static=True)
    vector_keys: tuple[str, ...] = eqx.field(static=True)
    cnn: ConvEncoder | None
    mlp: MLP | None
    out_dim: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    def __init__(self, spec: ObsSpec, config: WorldModelConfig, *, key: PRNGKeyArray, dtype: str = "float32"):
        self.image_keys, self.vector_keys = split_keys(spec, config)
        self.dtype = dtype
        k1, k2 = jax.random.split(key)
        self.cnn = self.mlp = None
        out = 0
        if self.image_keys:
            h, w, _ = spec[self.image_keys[0]][0]
            if h != w or any(spec[k][0][:2] != (h, w) for k in self.image_keys):
                raise ValueError(f"images must be square and of one size, got {[spec[k][0] for k in self.image_keys]}")
            channels = sum(spec[k][0][2] for k in self.image_keys)
            self.cnn = ConvEncoder(h, channels, config.cnn_depth, key=k1, norm=config.norm)
            out += self.cnn.out_dim
        if self.vector_keys:
            din = sum(spec[k][0][0] for k in self.vector_keys)
            self.mlp = MLP(din, config.units, config.layers, key=k2, norm=config.norm)
            out += config.units
        self.out_dim = out

    def __call__(self, obs: Mapping[str, Array]) -> Float[Array, "... e"]:
        outs = []
        if self.cnn is not None:
            outs.append(self.cnn(jnp.concatenate([obs[k] for k in self.image_keys], -1), self.dtype))
        if self.mlp is not None:
            vec = jnp.concatenate([obs[k].astype(jnp.float32) for k in self.vector_keys], -1)
            outs.append(self.mlp(symlog(vec).astype(self.dtype)))
        return jnp.concatenate(outs, -1)


class Decoder(eqx.Module):
    """Features `[..., F]` -> reconstruction loss per step `[...]` (negative log-likelihood).

    Images: MSE summed over pixels against image / 255. Vectors: MSE in symlog space.
    """

    image_keys: tuple[str, ...] = eqx.field(static=True)
    vector_keys: tuple[str, ...] = eqx.field(static=True)
    vector_dims: tuple[int, ...] = eqx.field(static=True)
    image_channels: tuple[int, ...] = eqx.field(static=True)
    cnn: ConvDecoder | None
    mlp: MLP | None
    vector_out: Linear | None
    dtype: str = eqx.field(static=True)

    def __init__(self, spec: ObsSpec, feat_dim: int, config: WorldModelConfig, *, key: PRNGKeyArray,
                 deter_dim: int = 0, dtype: str = "float32"):
        """`deter_dim`: how many leading features are the deterministic state (for the block decoder);
        `dtype`: the compute dtype (predictions are float32)."""
        self.image_keys, self.vector_keys = split_keys(spec, config)
        self.dtype = dtype
        self.vector_dims = tuple(spec[k][0][0] for k in self.vector_keys)
        self.image_channels = tuple(spec[k][0][2] for k in self.image_keys)
        k1, k2, k3 = jax.random.split(key, 3)
        self.cnn = self.mlp = self.vector_out = None
        if self.image_keys:
            h = spec[self.image_keys[0]][0][0]
            channels = sum(spec[k][0][2] for k in self.image_keys)
            if config.decoder_blocks and not deter_dim:
                raise ValueError("the block image decoder needs the sequence model's deter_dim (the leading "
                                 "features that are its deterministic state); without it set "
                                 "WorldModelConfig.decoder_blocks=0 (--agent.world-model.decoder-blocks 0)")
            self.cnn = ConvDecoder(feat_dim, h, channels, config.cnn_depth, key=k1, norm=config.norm,
                                   blocks=config.decoder_blocks, deter_dim=deter_dim, hidden=2 * config.units)
        if self.vector_keys:
            self.mlp = MLP(feat_dim, config.units, config.layers, key=k2, norm=config.norm)
            self.vector_out = Linear(config.units, sum(self.vector_dims), key=k3)

    def __call__(self, feat: Float[Array, "... f"]) -> dict[str, Array]:
        """Predicted image(s) (in [0, 1]) and symlog vectors, by key (float32)."""
        out = {}
        feat = feat.astype(self.dtype)
        if self.cnn is not None:
            images = self.cnn(feat).astype(jnp.float32)
            for k, part in zip(self.image_keys, jnp.split(images, np.cumsum(self.image_channels)[:-1], -1)):
                out[k] = part
        if self.mlp is not None:
            vec = self.vector_out(self.mlp(feat)).astype(jnp.float32)
            for k, part in zip(self.vector_keys, jnp.split(vec, np.cumsum(self.vector_dims)[:-1], -1)):
                out[k] = part
        return out

    def loss(self, feat: Float[Array, "... f"], obs: Mapping[str, Array]) -> dict[str, Array]:
        """Per-key reconstruction loss `[...]`."""
        pred = self(feat)
        losses = {}
        for k in self.image_keys:
            target = obs[k].astype(jnp.float32) / 255.0
            losses[k] = jnp.sum(jnp.square(pred[k] - target), (-3, -2, -1))
        for k in self.vector_keys:
            losses[k] = jnp.sum(jnp.square(pred[k] - symlog(obs[k].astype(jnp.float32))), -1)
        return losses


class Head(eqx.Module):
    """MLP -> Linear; `zero_init` makes the first output exactly zero (reward, value). It computes in
    `dtype` and outputs float32."""

    mlp: MLP
    out: Linear
    dtype: str = eqx.field(static=True)

    def __init__(self, din: int, dout: int, units: int, layers: int, *, key: PRNGKeyArray,
                 zero_init: bool = False, norm: Norm = "rms", dtype: str = "float32"):
        k1, k2 = jax.random.split(key)
        self.dtype = dtype
        self.mlp = MLP(din, units, layers, key=k1, norm=norm)
        self.out = Linear(units if layers else din, dout, key=k2, outscale=0.0 if zero_init else 1.0)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... o"]:
        return self.out(self.mlp(x.astype(self.dtype))).astype(jnp.float32)


class WorldModel(eqx.Module):
    """Learns p(o, r, c | s) and the latent dynamics from replayed sequences."""

    config: WorldModelConfig = eqx.field(static=True)
    encoder: Encoder
    dynamics: SequenceModel
    decoder: Decoder
    reward_head: Head
    cont_head: Head

    def __init__(self, config: WorldModelConfig, obs_spec: ObsSpec, action_dim: int, *, key: PRNGKeyArray,
                 dtype: str = "float32"):
        """`dtype`: the compute dtype of the networks (parameters, logits and losses stay float32)."""
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        self.config = config
        self.encoder = Encoder(obs_spec, config, key=k1, dtype=dtype)
        self.dynamics = make_sequence_model(config.sequence, self.encoder.out_dim, action_dim, key=k2, dtype=dtype)
        feat = self.dynamics.feature_dim
        self.decoder = Decoder(obs_spec, feat, config, key=k3, deter_dim=self.dynamics.deter_dim, dtype=dtype)
        head_units = config.head_units or config.units
        self.reward_head = Head(feat, config.bins, head_units, config.head_layers, key=k4, zero_init=True,
                                norm=config.norm, dtype=dtype)
        self.cont_head = Head(feat, 1, head_units, config.head_layers, key=k5, norm=config.norm, dtype=dtype)

    def reward(self, feat: Float[Array, "... f"]) -> TwoHot:
        return TwoHot(self.reward_head(feat), symexp_bins(self.config.bins))

    def cont(self, feat: Float[Array, "... f"]) -> Bernoulli:
        return Bernoulli(self.cont_head(feat)[..., 0])

    def loss(self, data: Mapping[str, Array], state: State, key: PRNGKeyArray, cont_discount: float = 1.0
             ) -> tuple[Float[Array, ""], tuple[State, dict[str, Array]]]:
        """World-model loss on a replayed batch.

        **Arguments:** `data` with observation keys `[B, T, ...]`, `action` `[B, T, A]` (the action
        into each step), `reward`, `is_first`, `is_terminal` `[B, T]`; `state`: the sequence model's
        state before the first step (`[B]`); `cont_discount`: the continue head learns
        `(1 - is_terminal) * cont_discount` (DreamerV3 2024 passes gamma, so it predicts the discount).

        **Returns:** (scalar loss averaged over B x T, (posterior states `[B, T]`, metrics)).
        """
        c = self.config
        embed = self.encoder(data)
        post, prior = self.dynamics.observe(state, embed, data["action"], data["is_first"], key)
        dyn, rep = self.dynamics.kl_loss(post, prior, c.free_nats)
        feat = self.dynamics.features(post)
        rec = self.decoder.loss(feat, data)
        reward, cont, terminal = self.reward(feat), self.cont(feat), data["is_terminal"].astype(jnp.float32)
        rew = -reward.log_prob(data["reward"].astype(jnp.float32))
        con = -cont.log_prob(cont_discount * (1.0 - terminal))
        total = (c.rec_scale * sum(rec.values()) + c.reward_scale * rew + c.cont_scale * con
                 + c.dyn_scale * dyn + c.rep_scale * rep)
        metrics = {"loss/dyn": dyn.mean(), "loss/rep": rep.mean(), "loss/reward": rew.mean(),
                   "loss/cont": con.mean(), **{f"loss/rec_{k}": v.mean() for k, v in rec.items()},
                   # how well the heads predict the replayed steps (terminal steps grow rare as episodes grow)
                   "replay/reward_abs_error": jnp.abs(sg(reward.mean()) - data["reward"]).mean(),
                   "replay/terminal_share": terminal.mean(),
                   "replay/cont_at_terminal": (sg(cont.mean()) / cont_discount * terminal).sum()
                   / jnp.maximum(terminal.sum(), 1.0)}
        return total.mean(), (post, metrics)

    def open_loop(self, data: Mapping[str, Array], state: State, context: int, key: PRNGKeyArray
                  ) -> dict[str, Float[Array, "b t ..."]]:
        """Observe the first `context` steps of `data`, then imagine the rest with its actions
        (DreamerV3's open-loop predictions).

        **Arguments:** `data` as for `loss` (`[B, T]`; rewards and flags other than `is_first` unused),
        `state` the sequence model's state before the first step (`[B]`), `context` < T.

        **Returns:** the decoder's predictions by observation key, `[B, T, ...]` (images in [0, 1]):
        reconstructions of the `context` observed steps, then T - context imagined ones.
        """
        k1, k2 = jax.random.split(key)
        head = {k: v[:, :context] for k, v in data.items()}
        post, _ = self.dynamics.observe(state, self.encoder(head), head["action"], head["is_first"], k1)

        def step(s, inputs):
            action, k = inputs
            s = self.dynamics.img_step(s, action, k)
            return s, s

        actions = jnp.swapaxes(data["action"][:, context:], 0, 1)  # the action into each imagined step
        last = jax.tree.map(lambda x: x[:, -1], post)
        _, imagined = jax.lax.scan(step, last, (actions, jax.random.split(k2, actions.shape[0])))
        imagined = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), imagined)
        feat = jnp.concatenate([self.dynamics.features(post), self.dynamics.features(imagined)], 1)
        return self.decoder(feat)

    def imagine(self, start: State, policy: Callable[[Array, PRNGKeyArray], Array], horizon: int,
                key: PRNGKeyArray) -> tuple[State, Float[Array, "n h a"]]:
        """Roll the prior forward from `start` (`[N]`) with actions from `policy(policy_features, key)`.

        **Returns:** (states `[N, horizon + 1]` including the start, actions `[N, horizon]` where
        action t was taken in state t).
        """

        def step(state, k):
            k1, k2 = jax.random.split(k)
            action = policy(self.dynamics.policy_features(state), k1)
            nxt = self.dynamics.img_step(state, action, k2)
            return nxt, (nxt, action)

        _, (states, actions) = jax.lax.scan(step, start, jax.random.split(key, horizon))
        swap = lambda x: jnp.swapaxes(x, 0, 1)
        states = jax.tree.map(lambda s0, s: jnp.concatenate([s0[:, None], swap(s)], 1), start, states)
        return states, swap(actions)


def open_loop_video(wm: WorldModel, batch: Mapping[str, Array], key: PRNGKeyArray, context: int = 5
                    ) -> dict[str, UInt8[Array, "t bh w3 c"]]:
    """DreamerV3's "dreams" as videos: the world model observes the first `context` steps of each
    sequence from a blank state, then imagines the rest with the sequence's actions (`open_loop`).
    Pure; jit it (`agent.open_loop_video` is the agent's compiled one) with `context` static.

    **Arguments:** `batch`: steps `[B, T]` as for `WorldModel.loss`; `context` < T.

    **Returns:** per image observation key, a uint8 video `[T, B * H, 3 * W, C]`: sequence b in
    rows b*H..(b+1)*H, each frame truth | prediction | error side by side, where error is
    (prediction - truth + 1) / 2 (grey where they agree).
    """
    b = batch["is_first"].shape[0]
    pred = wm.open_loop(batch, wm.dynamics.initial(b), context, key)
    videos = {}
    for k in wm.decoder.image_keys:
        truth = batch[k].astype(jnp.float32) / 255.0
        model = jnp.clip(pred[k], 0.0, 1.0)
        frames = jnp.concatenate([truth, model, (model - truth + 1.0) / 2.0], -2)  # [B, T, H, 3W, C]
        frames = jnp.swapaxes(frames, 0, 1)  # [T, B, H, 3W, C]
        frames = frames.reshape(frames.shape[0], -1, *frames.shape[3:])
        videos[k] = jnp.round(frames * 255.0).astype(jnp.uint8)
    return videos
