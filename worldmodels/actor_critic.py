"""Actor, critic, lambda returns and the percentile return normaliser (DreamerV3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from worldmodels.dists import BoundedNormal, OneHotCategorical, TwoHot, symexp_bins
from worldmodels.nn import MLP, Linear
from worldmodels.nn.layers import Norm


@dataclass(frozen=True)
class ActorCriticConfig:
    units: int = 64
    layers: int = 3
    horizon: int = 15  # imagination steps
    discount_horizon: float = 333.0  # gamma = 1 - 1 / discount_horizon
    # 2024: the continue head learns (1 - terminal) * gamma and its predictions are the discounts of
    # every imagined step. 2023 (False): it learns 1 - terminal, imagination multiplies by gamma, and
    # the first imagined step (a replayed state) continues unless it was terminal.
    contdisc: bool = True
    lam: float = 0.95
    entropy: float = 3e-4
    unimix: float = 0.01
    minstd: float = 0.1
    maxstd: float = 1.0
    bins: int = 255
    slow_rate: float = 0.02  # EMA rate of the slow critic, every update
    slow_reg: float = 1.0  # weight of the regulariser towards the slow critic
    retnorm_rate: float = 0.01
    retnorm_limit: float = 1.0
    retnorm_low: float = 5.0  # percentiles
    retnorm_high: float = 95.0
    retnorm_debias: bool = False  # the reference keeps the zero-initialised EMA as is
    actor_outscale: float = 0.01  # small output layer: the first policy is close to uniform
    actor_scale: float = 1.0
    critic_scale: float = 1.0
    repval_scale: float = 0.3  # critic loss on lambda returns of the replayed sequences (0: off)
    repval_grad: bool = True  # that loss also trains the world model (the reference's default)
    norm: Norm = "rms"


class Actor(eqx.Module):
    """Policy features `[..., F]` -> action distribution (one-hot categorical or bounded normal). The
    network computes in `dtype`; the distribution is float32."""

    discrete: bool = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)
    config: ActorCriticConfig = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    mlp: MLP
    out: Linear

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, config: ActorCriticConfig, *,
                 key: PRNGKeyArray, dtype: str = "float32"):
        k1, k2 = jax.random.split(key)
        self.discrete, self.action_dim, self.config, self.dtype = discrete, action_dim, config, dtype
        self.mlp = MLP(feat_dim, config.units, config.layers, key=k1, norm=config.norm)
        self.out = Linear(config.units, action_dim if discrete else 2 * action_dim, key=k2,
                          outscale=config.actor_outscale)

    def __call__(self, feat: Float[Array, "... f"]) -> OneHotCategorical | BoundedNormal:
        x = self.out(self.mlp(feat.astype(self.dtype))).astype(jnp.float32)
        if self.discrete:
            return OneHotCategorical.from_logits(x, self.config.unimix)
        mean, std = jnp.split(x, 2, -1)
        return BoundedNormal.from_outputs(mean, std, self.config.minstd, self.config.maxstd)


class Critic(eqx.Module):
    """Policy features `[..., F]` -> twohot value distribution; the output layer starts at zero. The
    network computes in `dtype`; the distribution is float32."""

    bins: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    mlp: MLP
    out: Linear

    def __init__(self, feat_dim: int, config: ActorCriticConfig, *, key: PRNGKeyArray, dtype: str = "float32"):
        k1, k2 = jax.random.split(key)
        self.bins, self.dtype = config.bins, dtype
        self.mlp = MLP(feat_dim, config.units, config.layers, key=k1, norm=config.norm)
        self.out = Linear(config.units, config.bins, key=k2, outscale=0.0)

    def __call__(self, feat: Float[Array, "... f"]) -> TwoHot:
        return TwoHot(self.out(self.mlp(feat.astype(self.dtype))).astype(jnp.float32), symexp_bins(self.bins))


def lambda_return(reward: Float[Array, "... h"], discount: Float[Array, "... h"],
                  next_value: Float[Array, "... h"], lam: float | Float[Array, "... h"]) -> Float[Array, "... h"]:
    """TD(lambda) returns over the last (time) axis, bootstrapped from the last `next_value`.

    For transitions t -> t+1 (t = 0..H-1): `reward[t]` = r_{t+1}, `discount[t]` = gamma * c_{t+1},
    `next_value[t]` = v(s_{t+1}). Computes
    `R_t = r_{t+1} + discount_t * ((1 - lam_t) * v_{t+1} + lam_t * R_{t+1})` with `R_H = v_H`.
    `lam` is a constant or one per transition (0 where an episode ends, to stop the recursion there).
    """
    lam = jnp.broadcast_to(jnp.asarray(lam, reward.dtype), reward.shape)

    def step(next_ret, inputs):
        r, d, v, l = inputs
        ret = r + d * ((1.0 - l) * v + l * next_ret)
        return ret, ret

    move = lambda x: jnp.moveaxis(x, -1, 0)
    _, rets = jax.lax.scan(step, move(next_value)[-1],
                           (move(reward), move(discount), move(next_value), move(lam)), reverse=True)
    return jnp.moveaxis(rets, 0, -1)


class ReturnNormState(NamedTuple):
    """Debiased EMAs of the low and high return percentiles."""

    low: Float[Array, ""]
    high: Float[Array, ""]
    correction: Float[Array, ""]  # 1 - (1 - rate)^updates, to undo the EMA's zero initialisation


def return_norm_init() -> ReturnNormState:
    return ReturnNormState(jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))


def return_norm_update(state: ReturnNormState, returns: Array, config: ActorCriticConfig) -> ReturnNormState:
    """Move the percentile EMAs towards this batch's P`low` and P`high` of `returns`."""
    r = config.retnorm_rate
    low, high = jnp.percentile(returns, jnp.array([config.retnorm_low, config.retnorm_high]))
    return ReturnNormState((1 - r) * state.low + r * low, (1 - r) * state.high + r * high,
                           (1 - r) * state.correction + r)


def return_norm_scale(state: ReturnNormState, config: ActorCriticConfig) -> Float[Array, ""]:
    """S = max(limit, P_high - P_low): advantages are divided by this."""
    correction = jnp.maximum(state.correction, 1e-8) if config.retnorm_debias else 1.0
    return jnp.maximum(config.retnorm_limit, (state.high - state.low) / correction)
