"""The DreamerV3 optimiser chain against hand-computed updates."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from worldmodels.optim import OptimConfig, clip_by_agc, decay_mask, make_optimizer


def test_agc_clips_each_tensor_relative_to_its_parameter_norm():
    params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.0])}  # norms 5 and 0 (-> pmin)
    grads = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([1.0, 0.0])}
    clipped, _ = clip_by_agc(0.3, 1e-3).update(grads, None, params)
    # a: |g| = 50 > 0.3 * 5 = 1.5 -> scaled to norm 1.5; b: |g| = 1 > 0.3 * 1e-3 -> norm 3e-4
    np.testing.assert_allclose(clipped["a"], np.array([30.0, 40.0]) * 1.5 / 50, rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [3e-4, 0.0], rtol=1e-6)
    small = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.0, 0.0])}
    unclipped, _ = clip_by_agc(0.3, 1e-3).update(small, None, params)
    np.testing.assert_allclose(unclipped["a"], small["a"])


def test_first_updates_match_hand_computation():
    # RMS scaling and momentum are both debiased: with the same gradient each update is
    # -lr_k * sign(g) elementwise, where the warmup ramp lr_k = lr * k / warmup starts at 0.
    config = OptimConfig(lr=1e-3, warmup=10, agc=1e6)
    opt = make_optimizer(config)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([0.2, -5.0, 1e-3])}
    state = opt.init(params)
    for k in range(3):
        updates, state = opt.update(grads, state, params)
        np.testing.assert_allclose(updates["w"], -1e-4 * k * np.sign(grads["w"]), rtol=1e-5)
    state = make_optimizer(OptimConfig(lr=1e-3, warmup=0, agc=1e6)).init(params)
    updates, _ = make_optimizer(OptimConfig(lr=1e-3, warmup=0, agc=1e6)).update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -1e-3 * np.sign(grads["w"]), rtol=1e-5)  # no warmup: full lr


def test_weight_decay_skips_ssm_parameters():
    class Block(eqx.Module):
        ssm: dict
        dense: jax.Array

    params = Block(ssm={"lambda_re": jnp.ones(2)}, dense=jnp.ones(2))
    mask = decay_mask(params)
    assert mask.ssm["lambda_re"] is False and mask.dense is True
    opt = make_optimizer(OptimConfig(lr=1.0, warmup=0, weight_decay=0.5, agc=1e6))
    zero = jax.tree.map(jnp.zeros_like, params)
    # With zero gradients the only update is the decay: -lr * wd * param, and none on the SSM part.
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates.dense, [-0.5, -0.5])
    np.testing.assert_allclose(updates.ssm["lambda_re"], [0.0, 0.0])
