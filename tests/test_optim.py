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


def test_weight_decay_reaches_weights_and_kernels_only():
    """R2I's `wd_pattern`: weight matrices and conv kernels, not biases or norms, not SSM parameters."""

    class Layer(eqx.Module):
        weight: jax.Array
        bias: jax.Array

    class Conv(eqx.Module):
        kernel: jax.Array

    class Block(eqx.Module):
        ssm: Layer
        dense: Layer
        conv: Conv
        scale: jax.Array

    ones = jnp.ones((2, 2))
    params = Block(ssm=Layer(ones, jnp.ones(2)), dense=Layer(ones, jnp.ones(2)), conv=Conv(ones), scale=jnp.ones(2))
    mask = decay_mask(params)
    assert mask.conv.kernel is True and mask.dense.weight is True and mask.dense.bias is False and mask.scale is False
    assert mask.ssm.weight is False and mask.ssm.bias is False
    opt = make_optimizer(OptimConfig(lr=1.0, warmup=0, weight_decay=0.5, agc=1e6))
    zero = jax.tree.map(jnp.zeros_like, params)
    # With zero gradients the only update is the decay: -lr * wd * param, where the mask allows it.
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates.dense.weight, -0.5 * ones)
    for leaf in (updates.dense.bias, updates.ssm.weight, updates.ssm.bias, updates.scale):
        np.testing.assert_allclose(leaf, 0.0)


def test_agent_weight_decay_is_on_the_world_model_only():
    """R2I decays its model optimiser's weights; its actor and critic optimisers have no decay."""
    from worldmodels import agent as agent_lib
    from worldmodels.config import make_config

    config = make_config(["debug"], {"agent.world_model.sequence.model": "s3m", "agent.optim.weight_decay": 0.5,
                                     "agent.optim.warmup": 0, "agent.optim.agc": 1e6}).agent
    state = agent_lib.init(config, {"vector": ((3,), "float32")}, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(0))
    params = eqx.filter(state.params, eqx.is_array)
    opt = agent_lib._optimizer(config.optim)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    decayed = {jax.tree_util.keystr(p) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0] if jnp.any(u != 0)}
    assert decayed and all(p.startswith("[0]") for p in decayed)  # the world model
    assert all(p.endswith((".weight", ".kernel")) and ".ssm." not in p for p in decayed)
    assert any(".ssm." in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    weights = {"[0]" + jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params[0])[0]
               if jax.tree_util.keystr(p).endswith((".weight", ".kernel")) and jnp.any(x != 0)}
    assert decayed == {p for p in weights if ".ssm." not in p}  # (zero-initialised output layers stay 0)
