"""Building blocks against plain reference formulations."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldmodels.nn import BlockLinear, ConvDecoder, ConvEncoder, Linear, Normalize
from worldmodels.sequence.rssm import RSSM, RSSMConfig


def test_block_linear_equals_block_diagonal_dense_matrix():
    layer = BlockLinear(12, 6, 3, key=jax.random.PRNGKey(0))
    layer = jax.tree.map(lambda b: b + 0.1, layer)  # nonzero bias
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    dense = np.zeros((12, 6), np.float32)
    for g, block in enumerate(np.asarray(layer.weight)):
        dense[4 * g:4 * g + 4, 2 * g:2 * g + 2] = block
    np.testing.assert_allclose(layer(x), x @ dense + np.asarray(layer.bias), rtol=1e-5, atol=1e-5)


def test_block_gru_equals_broadcast_formulation():
    """The fast group-major GRU computes the reference's block GRU: each group reads [its slice of h,
    all of x] through its own block, gates split as [reset | candidate | update] within a group."""
    model = RSSM(RSSMConfig(deter=16, hidden=8, stoch=4, classes=3, blocks=2), 5, 2, key=jax.random.PRNGKey(0))
    # a scale that differs per element, so the test sees which element each scale entry multiplies
    model = eqx.tree_at(lambda m: m.hidden_norm.scale, model, jnp.linspace(0.5, 2.0, 16))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    deter = jax.random.normal(keys[0], (3, 16))
    stoch = jax.random.normal(keys[1], (3, 4, 3))
    action = 3 * jax.random.normal(keys[2], (3, 2))

    def reference(m, deter, stoch, action):
        g = m.config.blocks
        action = action / jnp.maximum(1.0, jnp.abs(action))
        x = jnp.concatenate([m.in_deter(deter), m.in_stoch(stoch.reshape(3, -1)), m.in_action(action)], -1)
        x = jnp.broadcast_to(x[:, None, :], (3, g, x.shape[-1]))
        x = jnp.concatenate([deter.reshape(3, g, -1), x], -1).reshape(3, -1)
        x = jax.nn.silu(m.hidden_norm(m.hidden_layer(x)))  # one norm over the whole deter vector
        reset, cand, update = jnp.split(m.gates(x).reshape(3, g, -1), 3, axis=-1)
        reset = jax.nn.sigmoid(reset.reshape(3, -1))
        cand = jnp.tanh(reset * cand.reshape(3, -1))
        update = jax.nn.sigmoid(update.reshape(3, -1) - 1.0)
        return update * cand + (1 - update) * deter

    fast = model._gru(deter, stoch, model._action_input(action))
    np.testing.assert_allclose(fast, reference(model, deter, stoch, action), atol=1e-5)


def test_initial_weight_scales_follow_the_reference():
    """Truncated normal with std 1 / sqrt(fan_in), times `outscale`; a block layer's fan-in is its
    whole input (the reference's fan-in of a [blocks, i, o] kernel is blocks * i)."""
    key = jax.random.PRNGKey(0)
    for outscale in (1.0, 0.01):
        w = np.asarray(Linear(512, 512, key=key, outscale=outscale).weight)
        assert abs(w.std() * np.sqrt(512) / outscale - 1.0) < 0.01
        assert np.abs(w).max() <= 2 * outscale / np.sqrt(512) / 0.8796 + 1e-7
    w = np.asarray(BlockLinear(1024, 512, 8, key=key).weight)
    assert w.shape == (8, 128, 64) and abs(w.std() * np.sqrt(1024) - 1.0) < 0.01
    w = np.asarray(BlockLinear(1024, 512, 8, key=key, per_block_fan_in=True).weight)
    assert abs(w.std() * np.sqrt(128) - 1.0) < 0.01


def test_grouped_norm_equals_the_norm_of_the_whole_vector():
    for kind in ("rms", "layer"):
        norm = Normalize(12, kind)
        norm = eqx.tree_at(lambda n: n.scale, norm, jnp.linspace(0.5, 2.0, 12))
        if kind == "layer":
            norm = eqx.tree_at(lambda n: n.offset, norm, jnp.linspace(-1.0, 1.0, 12))
        x = jax.random.normal(jax.random.PRNGKey(0), (5, 12)) * jnp.arange(1, 13)
        grouped = norm.grouped(jnp.moveaxis(x.reshape(5, 3, 4), 1, 0))  # [groups, n, per group]
        np.testing.assert_allclose(jnp.moveaxis(grouped, 0, 1).reshape(5, 12), norm(x), rtol=1e-5, atol=1e-6)


def test_zero_init_linear_and_norms():
    assert np.all(np.asarray(Linear(4, 3, key=jax.random.PRNGKey(0), outscale=0.0)(jnp.ones(4))) == 0)
    x = np.array([[3.0, -4.0]], np.float32)
    np.testing.assert_allclose(Normalize(2, "rms", eps=0.0)(x), x / np.sqrt(12.5), rtol=1e-6)
    np.testing.assert_allclose(Normalize(2, "layer", eps=0.0)(x), [[1.0, -1.0]], rtol=1e-6)


def test_conv_encoder_decoder_shapes_for_powers_of_two():
    # depth 2, channel multipliers (2, 3, 4, 4): the last stage's channels depend on the stage count
    for side, stages, channels in ((64, 4, 8), (32, 3, 8), (16, 2, 6)):
        enc = ConvEncoder(side, 3, 2, key=jax.random.PRNGKey(0))
        out = enc(jnp.zeros((2, 5, side, side, 3), jnp.uint8))
        assert out.shape == (2, 5, 4 * 4 * channels) and len(enc.convs) == stages
        dec = ConvDecoder(7, side, 3, 2, key=jax.random.PRNGKey(1))
        image = dec(jax.random.normal(jax.random.PRNGKey(2), (2, 5, 7)))
        # the last upsampling feeds the output conv directly (no conv at full resolution)
        assert image.shape == (2, 5, side, side, 3) and len(dec.convs) == stages - 1
        assert float(image.min()) > 0 and float(image.max()) < 1  # sigmoid, target image / 255
    with pytest.raises(ValueError, match="power of two"):
        ConvEncoder(48, 3, 2, key=jax.random.PRNGKey(0))


def test_block_decoder_grid_follows_the_reference_layout():
    """The reference's block input: deter (first 8 features) through a 2-block BlockLinear whose output
    is read as (block, h, w, c) and laid out as [h, w, (block, c)], plus stoch (last 4 features)
    through Linear -> RMSNorm -> SiLU -> Linear read as [h, w, c]. Checked with dense numpy matrices."""
    dec = ConvDecoder(12, 8, 3, 2, key=jax.random.PRNGKey(0), blocks=2, deter_dim=8, hidden=5)  # 4x4x4 grid
    dec = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(3), x.shape), dec)  # biases, scales
    feat = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    w = np.asarray(dec.grid_from_deter.weight, np.float64)  # [2, 4, 32]
    dense = np.zeros((8, 64))
    dense[:4, :32], dense[4:, 32:] = w[0], w[1]
    from_deter = feat[:, :8] @ dense + np.asarray(dec.grid_from_deter.bias)
    from_deter = from_deter.reshape(3, 2, 4, 4, 2).transpose(0, 2, 3, 1, 4).reshape(3, 4, 4, 4)
    hid = dec.stoch_hidden
    h = feat[:, 8:] @ np.asarray(hid.linear.weight, np.float64) + np.asarray(hid.linear.bias)
    h = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-4) * np.asarray(hid.norm.scale)
    h = h / (1 + np.exp(-h))
    from_stoch = h @ np.asarray(dec.grid_from_stoch.weight, np.float64) + np.asarray(dec.grid_from_stoch.bias)
    expected = from_deter + from_stoch.reshape(3, 4, 4, 4)
    np.testing.assert_allclose(dec._grid(jnp.asarray(feat)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"use 2 blocks.*decoder-blocks 2\)"):
        ConvDecoder(12, 8, 3, 2, key=jax.random.PRNGKey(0), blocks=3, deter_dim=8, hidden=5)


def test_conv_encoder_stage_is_conv_pool_norm_silu():
    enc = ConvEncoder(8, 3, 2, key=jax.random.PRNGKey(0))  # one stage: 8x8 -> 4x4, 4 channels
    enc = eqx.tree_at(lambda e: e.norms[0].scale, enc, jnp.array([0.5, 1.0, 1.5, 2.0]))
    image = jax.random.randint(jax.random.PRNGKey(1), (2, 8, 8, 3), 0, 256).astype(jnp.uint8)
    x = np.asarray(enc.convs[0](image.astype(jnp.float32) / 255.0 - 0.5), np.float64)
    x = x.reshape(2, 4, 2, 4, 2, 4).max((2, 4))
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-4) * np.array([0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(enc(image), (x / (1 + np.exp(-x))).reshape(2, -1), rtol=1e-5, atol=1e-6)
