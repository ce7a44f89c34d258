"""Distributions and transforms used by DreamerV3: symlog, twohot, unimix categoricals, bounded normal.

Each distribution is a NamedTuple of arrays (so a PyTree) with methods; event dimensions are the
trailing ones and every method reduces over them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

sg = jax.lax.stop_gradient


def symlog(x: Array) -> Array:
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity-like near 0."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x: Array) -> Array:
    """Inverse of `symlog`."""
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def symexp_bins(num: int = 255, limit: float = 20.0) -> Float[Array, " num"]:
    """`num` (odd) bins at symexp(linspace(-limit, limit)), exactly symmetric around an exact 0."""
    if num % 2 != 1:
        raise ValueError(f"twohot needs an odd number of bins, got {num}")
    half = symexp(jnp.linspace(-limit, 0.0, (num - 1) // 2 + 1))
    return jnp.concatenate([half, -half[:-1][::-1]])


def _twohot_parts(x: Float[Array, "..."], bins: Float[Array, " k"]) -> tuple[Array, Array, Array, Array]:
    """(index below, index above, weight below, weight above) of each scalar's two neighbouring bins."""
    k = bins.shape[0]
    count = jnp.searchsorted(bins, x, side="right")  # number of bins <= x
    below = jnp.clip(count - 1, 0, k - 1)
    above = jnp.clip(count, 0, k - 1)  # == below beyond either end
    dist_below = jnp.abs(bins[below] - x)
    dist_above = jnp.abs(bins[above] - x)
    same = below == above
    total = jnp.where(same, 1.0, dist_below + dist_above)
    w_below = jnp.where(same, 1.0, dist_above / total)
    w_above = jnp.where(same, 0.0, dist_below / total)
    return below, above, w_below, w_above


def twohot_encode(x: Float[Array, "..."], bins: Float[Array, " k"]) -> Float[Array, "... k"]:
    """Spread each scalar over its two neighbouring bins so that the weighted bin average is `x`.

    Values outside the bins' range go entirely to the nearest end bin.
    """
    k = bins.shape[0]
    below, above, w_below, w_above = _twohot_parts(x, bins)
    return jax.nn.one_hot(below, k) * w_below[..., None] + jax.nn.one_hot(above, k) * w_above[..., None]


class TwoHot(NamedTuple):
    """Categorical over fixed real-valued bins (odd count, symmetric around an exact 0, as
    `symexp_bins` makes them), trained with a twohot cross-entropy."""

    logits: Float[Array, "... k"]
    bins: Float[Array, " k"]

    def mean(self) -> Float[Array, "..."]:
        # The bins are symmetric (bins[m - j] == -bins[m + j], see `symexp_bins`), so pair them up:
        # sum_j (p[m + j] - p[m - j]) * bins[m + j]. With uniform probabilities (a zero-initialised
        # head) every difference is exactly 0, so the first prediction is exactly 0, also under jit
        # where a plain weighted sum leaves fused multiply-add rounding behind.
        probs = jax.nn.softmax(self.logits, -1)
        m = (self.bins.shape[0] - 1) // 2
        diff = probs[..., m + 1:] - probs[..., :m][..., ::-1]
        return jnp.sum(diff * self.bins[m + 1:], -1)

    def log_prob(self, target: Float[Array, "..."]) -> Float[Array, "..."]:
        """Twohot cross-entropy (as a log-likelihood) of a scalar target: the log-probabilities of the
        two neighbouring bins, weighted (gathered, without building the [..., k] twohot vector)."""
        below, above, w_below, w_above = jax.tree.map(sg, _twohot_parts(target, self.bins))
        logp = jax.nn.log_softmax(self.logits, -1)
        take = lambda idx: jnp.take_along_axis(logp, idx[..., None], -1)[..., 0]
        # A NaN target would pick clipped bins with finite weights: keep it NaN, so that the train
        # step's non-finite guard sees it (a NaN reward otherwise trains the reward head on garbage).
        return jnp.where(jnp.isnan(target), jnp.nan, w_below * take(below) + w_above * take(above))


class OneHotCategorical(NamedTuple):
    """Independent categoricals over the last axis, with `unimix` uniform mixing already applied.

    `logits[..., n, k]`: event shape is everything after `batch_dims` (usually `(n, k)` for the
    latents or `(k,)` for a discrete action).
    """

    logits: Float[Array, "... k"]
    event_dims: int = 1

    @classmethod
    def from_logits(cls, logits: Array, unimix: float = 0.01, event_dims: int = 1) -> OneHotCategorical:
        probs = jax.nn.softmax(logits, -1)
        if unimix > 0:
            probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
        return cls(jnp.log(probs), event_dims)

    def _reduce(self, x: Array) -> Array:
        return jnp.sum(x, axis=tuple(range(-(self.event_dims - 1), 0))) if self.event_dims > 1 else x

    @property
    def probs(self) -> Array:
        return jax.nn.softmax(self.logits, -1)

    def sample(self, key: PRNGKeyArray) -> Array:
        """One-hot sample with straight-through gradients to the probabilities."""
        idx = jax.random.categorical(key, self.logits, -1)
        onehot = jax.nn.one_hot(idx, self.logits.shape[-1], dtype=self.logits.dtype)
        probs = self.probs
        return onehot + probs - sg(probs)

    def mode(self) -> Array:
        onehot = jax.nn.one_hot(jnp.argmax(self.logits, -1), self.logits.shape[-1], dtype=self.logits.dtype)
        probs = self.probs
        return onehot + probs - sg(probs)

    def log_prob(self, onehot: Array) -> Array:
        return self._reduce(jnp.sum(onehot * jax.nn.log_softmax(self.logits, -1), -1))

    def entropy(self) -> Array:
        logp = jax.nn.log_softmax(self.logits, -1)
        return self._reduce(-jnp.sum(jnp.exp(logp) * logp, -1))

    def kl(self, other: OneHotCategorical) -> Array:
        """KL(self || other), summed over the event dimensions."""
        logp = jax.nn.log_softmax(self.logits, -1)
        logq = jax.nn.log_softmax(other.logits, -1)
        return self._reduce(jnp.sum(jnp.exp(logp) * (logp - logq), -1))


class BoundedNormal(NamedTuple):
    """Diagonal normal with mean in [-1, 1] (tanh) and std in [minstd, maxstd] (sigmoid)."""

    mean_: Float[Array, "... a"]
    std: Float[Array, "... a"]

    @classmethod
    def from_outputs(cls, mean: Array, std: Array, minstd: float = 0.1, maxstd: float = 1.0) -> BoundedNormal:
        return cls(jnp.tanh(mean), (maxstd - minstd) * jax.nn.sigmoid(std + 2.0) + minstd)

    def sample(self, key: PRNGKeyArray) -> Array:
        return self.mean_ + self.std * jax.random.normal(key, self.mean_.shape)

    def mode(self) -> Array:
        return self.mean_

    def log_prob(self, x: Array) -> Array:
        z = (x - self.mean_) / self.std
        return jnp.sum(-0.5 * z**2 - jnp.log(self.std) - 0.5 * jnp.log(2 * jnp.pi), -1)

    def entropy(self) -> Array:
        return jnp.sum(0.5 * jnp.log(2 * jnp.pi * jnp.e) + jnp.log(self.std), -1)


class Bernoulli(NamedTuple):
    """Bernoulli over a logit; `log_prob` accepts soft targets in [0, 1]."""

    logit: Float[Array, "..."]

    def mean(self) -> Array:
        return jax.nn.sigmoid(self.logit)

    def mode(self) -> Array:
        return (self.logit > 0).astype(self.logit.dtype)

    def log_prob(self, x: Array) -> Array:
        return x * jax.nn.log_sigmoid(self.logit) + (1 - x) * jax.nn.log_sigmoid(-self.logit)
