"""The one interface every sequence model implements (RSSM, S3M, FFM, Transformer), and the pieces
the models with an embedding-only posterior share (S3M, FFM, Transformer).

Nothing above `worldmodels/sequence/` branches on which model it holds: the world model, the
imagination and the policy only call these methods.

Conventions: `state` is a PyTree whose leaves have leading batch axes (`[B]` for one step, `[B, T]`
for a sequence). At step t, `action` is the action that led INTO step t (a_{t-1}); at steps with
`is_first` the model resets its state to its initial state and ignores that action.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from worldmodels.dists import OneHotCategorical

State = Any  # a PyTree of arrays with leading batch axes


def reset_where(state: State, initial: State, is_first: Bool[Array, " b"]) -> State:
    """`initial` in the rows where `is_first`, `state` elsewhere (every leaf has a leading `[B]`)."""
    return jax.tree.map(lambda x, x0: jnp.where(is_first.reshape(-1, *[1] * (x.ndim - 1)), x0, x), state, initial)


def scale_action(action: Float[Array, "... a"]) -> Float[Array, "... a"]:
    """Actions divided by max(1, |a|) (no gradient through the scale), as the reference feeds them in."""
    return action / jax.lax.stop_gradient(jnp.maximum(1.0, jnp.abs(action)))


def categorical_logits(x: Float[Array, "... n"], stoch: int, classes: int, unimix: float) -> Float[Array, "... s k"]:
    """Flat logits `[..., stoch * classes]` as `stoch` categoricals (float32, `unimix` mixed in)."""
    logits = x.astype(jnp.float32).reshape(*x.shape[:-1], stoch, classes)
    return OneHotCategorical.from_logits(logits, unimix, event_dims=2).logits


def sample_steps(logits: Float[Array, "b t s k"], key: PRNGKeyArray) -> Float[Array, "b t s k"]:
    """One sample a step; step i uses `split(key, T)[i]`, as stepping `obs_step` with those keys does."""
    keys = jax.random.split(key, logits.shape[1])
    return jax.vmap(lambda lg, k: OneHotCategorical(lg, 2).sample(k), (1, 0), 1)(logits, keys)


def teacher_forcing(carried: Float[Array, "b s k"], stoch: Float[Array, "b t s k"], action: Float[Array, "b t a"],
                    is_first: Bool[Array, "b t"], initial: Float[Array, "s k"] | float = 0.0
                    ) -> tuple[Float[Array, "b t s k"], Float[Array, "b t a"]]:
    """The inputs (z_{t-1}, a_{t-1}) of every step of a sequence whose posteriors `stoch` are known,
    after the `carried` latent; at episode starts the `initial` latent and a zero action, as
    `obs_step`'s reset gives."""
    prev = jnp.concatenate([carried[:, None], stoch[:, :-1]], 1)
    prev = jnp.where(is_first[..., None, None], initial, prev)
    return prev, jnp.where(is_first[..., None], 0.0, action)


class ModelConfig:
    """What every sequence model's frozen config says of itself to the run around it."""

    keeps_replay_context: ClassVar[bool] = True  # False: replay stores no latent to continue from

    def window_problem(self, seq_len: int) -> str | None:
        """None if the model can learn from replayed windows of `seq_len` steps, else what is wrong."""
        return None


class SequenceModel(eqx.Module):
    """Abstract latent sequence model: a prior that imagines and a posterior that observes."""

    @abc.abstractmethod
    def initial(self, batch_size: int) -> State:
        """The initial (reset) state, batched: leaves `[batch_size, ...]`."""

    @abc.abstractmethod
    def observe(self, state: State, embed: Float[Array, "b t e"], action: Float[Array, "b t a"],
                is_first: Bool[Array, "b t"], key: PRNGKeyArray) -> tuple[State, State]:
        """Posterior and prior states for every step of a sequence, starting after `state` ([B])."""

    @abc.abstractmethod
    def obs_step(self, state: State, embed: Float[Array, "b e"], action: Float[Array, "b a"],
                 is_first: Bool[Array, "b"], key: PRNGKeyArray) -> tuple[State, State]:
        """One observed step: (posterior, prior) `[B]`. The path the policy uses when acting."""

    @abc.abstractmethod
    def img_step(self, state: State, action: Float[Array, "b a"], key: PRNGKeyArray) -> State:
        """One imagined step with the prior: the next state `[B]` given the action taken in `state`."""

    @abc.abstractmethod
    def features(self, state: State) -> Float[Array, "... f"]:
        """What the heads, the actor and the critic read from a state."""

    @property
    @abc.abstractmethod
    def feature_dim(self) -> int:
        """Size of `features(state)`'s last axis."""

    @property
    def deter_dim(self) -> int:
        """How many leading entries of `features(state)` are the deterministic state (the image
        decoder reads them through block-diagonal weights); 0: not split (the decoder must then be dense)."""
        return 0

    def policy_features(self, state: State) -> Float[Array, "... f"]:
        """What the actor and critic read (models may expose more of their state than the heads)."""
        return self.features(state)

    @property
    def policy_feature_dim(self) -> int:
        return self.feature_dim

    # --- replay context (DreamerV3 2024): replay keeps each step's posterior as an "entry", and a
    # sampled window continues from its first step's entry instead of the initial state.
    def entry(self, state: State) -> dict[str, Array]:
        """What replay stores of `state` (leaves `[..., *]` with any leading axes): arrays keyed by
        name. Default: every field of a NamedTuple state, as is. Models override it to store less."""
        return dict(state._asdict())

    def from_entry(self, entry: Mapping[str, Array]) -> State:
        """The state to continue from, given an `entry` `[B, ...]` (the inverse of `entry`)."""
        return type(self.initial(1))(**entry)

    def entry_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per step, name -> (shape, dtype) of `entry` (what a replay buffer allocates)."""
        shapes = jax.eval_shape(lambda: self.entry(self.initial(1)))
        return {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in shapes.items()}

    @abc.abstractmethod
    def kl_loss(self, post: State, prior: State, free: float) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
        """(dyn, rep) KL terms per step, each clipped below at `free` nats."""
