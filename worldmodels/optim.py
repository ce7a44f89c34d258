"""The DreamerV3 (2024) optimiser from optax pieces: AGC -> RMS scaling -> momentum -> warmup lr."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 4e-5
    warmup: int = 1000  # updates of linear learning-rate warmup from 0
    agc: float = 0.3  # clip each tensor's gradient norm to agc * max(pmin, ||param||)
    pmin: float = 1e-3
    beta1: float = 0.9  # momentum, applied after the RMS scaling ("LaProp")
    beta2: float = 0.999
    eps: float = 1e-20
    weight_decay: float = 0.0  # decoupled; the world model's weights only, never SSM parameters (R2I)
    # Learning rates of the actor and the critic; None = `lr` (2024: one rate). The 2023 variant used
    # separate ones (model 1e-4, actor and critic 3e-5); the agent scales those groups' updates.
    actor_lr: float | None = None
    critic_lr: float | None = None


def clip_by_agc(clip: float, pmin: float) -> optax.GradientTransformation:
    """Adaptive gradient clipping per parameter tensor: ||g|| <= clip * max(pmin, ||p||).

    (optax's `adaptive_grad_clip` clips per output unit; DreamerV3 clips whole tensors.)
    """

    def clip_fn(updates, params):
        def one(g, p):
            upper = clip * jnp.maximum(pmin, jnp.linalg.norm(p.ravel()))
            return g / jnp.maximum(1.0, jnp.linalg.norm(g.ravel()) / upper)

        return jax.tree.map(one, updates, params)

    return optax.stateless(clip_fn)


def decay_mask(params):
    """True for the parameters that get weight decay, as R2I's `wd_pattern`: weight matrices and
    convolution kernels (leaves named `weight` or `kernel`), not biases or norm parameters, and none
    of the SSM layers' parameters (any leaf below an attribute named `ssm`, see
    `worldmodels.sequence.s3m.SSMBlock`)."""

    def decays(path, leaf) -> bool:
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        return bool(names) and names[-1] in ("weight", "kernel") and "ssm" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig, mask=decay_mask) -> optax.GradientTransformation:
    """AGC -> RMS scaling -> momentum -> (decoupled weight decay where `mask(params)` is True) -> lr."""
    decay = [optax.add_decayed_weights(config.weight_decay, mask=mask)] if config.weight_decay else []
    return optax.chain(
        clip_by_agc(config.agc, config.pmin),
        optax.scale_by_rms(decay=config.beta2, eps=config.eps, eps_in_sqrt=False, bias_correction=True),
        optax.ema(config.beta1, debias=True),
        *decay,
        # as the reference: the ramp starts at 0, so the first update only fills the statistics
        optax.scale_by_learning_rate(
            optax.linear_schedule(0.0, config.lr, config.warmup) if config.warmup else config.lr),
    )
