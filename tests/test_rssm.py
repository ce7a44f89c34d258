"""Tests for worldmodels.sequence.rssm.RSSM with a tiny configuration.

Truth comes from plain numpy (KL sums, a numpy re-implementation of one step read off the module's
parameters) and from structural identities: `observe` equals a python loop of `obs_step` with the
same per-step keys, and a reset (`is_first`) makes the future independent of the past.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import OBS_STEP, loop_obs_step
from worldmodels.sequence.rssm import RSSM, RSSMConfig, RSSMState

CFG = RSSMConfig(deter=16, hidden=8, stoch=4, classes=3, blocks=2)
EMBED, ACT = 5, 2
B, T, T0 = 3, 6, 3
RESET_ROWS = [0, 2]  # rows with is_first at T0; row 1 runs on


@pytest.fixture(scope="module")
def model():
    return RSSM(CFG, EMBED, ACT, key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def inputs():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    embed = jax.random.normal(k1, (B, T, EMBED))
    action = jax.random.normal(k2, (B, T, ACT)) * 2.0  # some |a| > 1 to exercise the action scaling
    is_first = np.zeros((B, T), bool)
    is_first[:, 0] = True
    is_first[RESET_ROWS, T0] = True
    return embed, action, jnp.asarray(is_first)


OBSERVE = jax.jit(lambda m, *args: m.observe(*args))
IMG_STEP = jax.jit(lambda m, *args: m.img_step(*args))


def assert_state_close(a, b, rows=slice(None), steps=slice(None), atol=1e-5):
    for name in ("deter", "logits", "stoch"):
        np.testing.assert_allclose(getattr(a, name)[rows, steps], getattr(b, name)[rows, steps], atol=atol,
                                   err_msg=name)


# --- numpy reference ---------------------------------------------------------------------------------

def np_(x):
    return np.asarray(x, np.float64)


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_rms(x, scale, eps=1e-4):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np_(scale)


def np_dense(block, x):
    return np_silu(np_rms(x @ np_(block.linear.weight) + np_(block.linear.bias), block.norm.scale))


def np_mlp(mlp, x):
    for block in mlp.blocks:
        x = np_dense(block, x)
    return x


def np_unimix_logits(raw, stoch, classes, unimix=0.01):
    raw = raw.reshape(*raw.shape[:-1], stoch, classes)
    p = np.exp(raw - raw.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.log((1 - unimix) * p + unimix / classes)


def np_gru(m, deter, stoch, action):
    """One core step, group by group: group i reads [h_i, x] through its own block of `hidden_layer`."""
    c = m.config
    g, pg = c.blocks, c.deter // c.blocks
    action = action / np.maximum(1.0, np.abs(action))
    x = np.concatenate([np_dense(m.in_deter, deter), np_dense(m.in_stoch, stoch.reshape(len(stoch), -1)),
                        np_dense(m.in_action, action)], -1)
    w1, b1 = np_(m.hidden_layer.weight), np_(m.hidden_layer.bias)
    w2, b2 = np_(m.gates.weight), np_(m.gates.bias)
    y = np.concatenate([np.concatenate([deter[:, i * pg:(i + 1) * pg], x], -1) @ w1[i] + b1[i * pg:(i + 1) * pg]
                        for i in range(g)], -1)
    y = np_silu(np_rms(y, m.hidden_norm.scale))  # one norm over the whole deter vector
    hidden = [y[:, i * pg:(i + 1) * pg] for i in range(g)]
    new = np.zeros_like(deter)
    for i in range(g):
        out = hidden[i] @ w2[i] + b2[i * 3 * pg:(i + 1) * 3 * pg]
        reset, cand, update = out[:, :pg], out[:, pg:2 * pg], out[:, 2 * pg:]
        reset = np_sigmoid(reset)
        cand = np.tanh(reset * cand)
        update = np_sigmoid(update - 1.0)
        new[:, i * pg:(i + 1) * pg] = update * cand + (1 - update) * deter[:, i * pg:(i + 1) * pg]
    return new


def np_step(m, deter, stoch, embed, action):
    """(deter, prior logits, posterior logits) of an obs_step without reset."""
    c = m.config
    h = np_gru(m, deter, stoch, action)
    prior = np_unimix_logits(np_mlp(m.prior_net, h) @ np_(m.prior_out.weight) + np_(m.prior_out.bias),
                             c.stoch, c.classes)
    post_in = np.concatenate([h, embed], -1)
    post = np_unimix_logits(np_mlp(m.post_net, post_in) @ np_(m.post_out.weight) + np_(m.post_out.bias),
                            c.stoch, c.classes)
    return h, prior, post


def np_kl_sum(lp, lq):
    """KL(p || q) of independent categoricals, summed over the latents, with python loops."""
    lp, lq = np_(lp), np_(lq)
    out = np.zeros(lp.shape[0])
    for b in range(lp.shape[0]):
        for n in range(lp.shape[1]):
            zp = math.log(sum(math.exp(v) for v in lp[b, n]))
            zq = math.log(sum(math.exp(v) for v in lq[b, n]))
            for k in range(lp.shape[2]):
                p = math.exp(lp[b, n, k] - zp)
                out[b] += p * ((lp[b, n, k] - zp) - (lq[b, n, k] - zq))
    return out


# --- basics --------------------------------------------------------------------------------------

def test_initial_state_is_zeros(model):
    s = model.initial(B)
    assert s.deter.shape == (B, 16) and s.stoch.shape == (B, 4, 3) and s.logits.shape == (B, 4, 3)
    for leaf in s:
        assert np.all(np.asarray(leaf) == 0.0)


def test_features(model):
    assert model.feature_dim == 16 + 4 * 3
    s = RSSMState(jnp.arange(2 * 16.0).reshape(2, 16), jnp.arange(2 * 12.0).reshape(2, 4, 3) + 100,
                  jnp.zeros((2, 4, 3)))
    f = np.asarray(model.features(s))
    assert f.shape == (2, model.feature_dim)
    np.testing.assert_array_equal(f[:, :16], np.arange(32.0).reshape(2, 16))
    np.testing.assert_array_equal(f[:, 16:], np.arange(24.0).reshape(2, 12) + 100)
    # Also over [B, T] leading axes.
    st = jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], 5, *x.shape[1:])), s)
    assert model.features(st).shape == (2, 5, model.feature_dim)


def test_deter_not_divisible_by_blocks_rejected():
    with pytest.raises(ValueError):
        RSSM(RSSMConfig(deter=15, hidden=8, stoch=4, classes=3, blocks=2), EMBED, ACT, key=jax.random.PRNGKey(0))


def test_img_step_shapes_and_samples(model):
    state = model.initial(B)
    action = jnp.ones((B, ACT))
    for i in range(3):
        state = IMG_STEP(model, state, action, jax.random.PRNGKey(i))
    assert state.deter.shape == (B, 16)
    assert state.stoch.shape == (B, 4, 3) and state.logits.shape == (B, 4, 3)
    stoch = np.asarray(state.stoch)
    np.testing.assert_allclose(np.sort(stoch, -1), np.broadcast_to([0, 0, 1.0], stoch.shape), atol=1e-6)
    probs = np.exp(np.asarray(state.logits))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert probs.min() >= 0.01 / 3 * (1 - 1e-4)


def test_obs_step_matches_numpy_reference(model):
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    deter = jax.random.normal(k[0], (B, 16))
    stoch = jax.nn.one_hot(jax.random.randint(k[1], (B, 4), 0, 3), 3)
    embed = jax.random.normal(k[2], (B, EMBED))
    action = jnp.array([[3.0, -0.5], [0.2, -4.0], [0.0, 1.0]])
    state = RSSMState(deter, stoch, jnp.zeros((B, 4, 3)))
    post, prior = OBS_STEP(model, state, embed, action, jnp.zeros(B, bool), jax.random.PRNGKey(9))
    h, prior_logits, post_logits = np_step(model, np_(deter), np_(stoch), np_(embed), np_(action))
    np.testing.assert_allclose(post.deter, h, atol=1e-5)
    np.testing.assert_allclose(prior.deter, h, atol=1e-5)
    np.testing.assert_allclose(prior.logits, prior_logits, atol=1e-5)
    np.testing.assert_allclose(post.logits, post_logits, atol=1e-5)
    # The state moved: a test of a step that returns its input would not pass.
    assert np.abs(h - np_(deter)).max() > 1e-2


def test_obs_step_reset_matches_numpy_from_zeros(model):
    """With is_first the step starts from the zero state and ignores the given action."""
    k = jax.random.split(jax.random.PRNGKey(6), 3)
    state = RSSMState(jax.random.normal(k[0], (B, 16)), jax.nn.one_hot(jnp.zeros((B, 4), int), 3),
                      jnp.zeros((B, 4, 3)))
    embed = jax.random.normal(k[1], (B, EMBED))
    action = jax.random.normal(k[2], (B, ACT))
    post, prior = OBS_STEP(model, state, embed, action, jnp.ones(B, bool), jax.random.PRNGKey(0))
    h, prior_logits, post_logits = np_step(model, np.zeros((B, 16)), np.zeros((B, 4, 3)), np_(embed),
                                           np.zeros((B, ACT)))
    np.testing.assert_allclose(post.deter, h, atol=1e-5)
    np.testing.assert_allclose(prior.logits, prior_logits, atol=1e-5)
    np.testing.assert_allclose(post.logits, post_logits, atol=1e-5)


def test_img_step_equals_obs_step_prior(model):
    """The prior path of obs_step and img_step are the same transition."""
    k = jax.random.split(jax.random.PRNGKey(7), 3)
    state = RSSMState(jax.random.normal(k[0], (B, 16)), jax.nn.one_hot(jnp.ones((B, 4), int), 3),
                      jnp.zeros((B, 4, 3)))
    action = jax.random.normal(k[1], (B, ACT))
    _, prior = model.obs_step(state, jax.random.normal(k[2], (B, EMBED)), action, jnp.zeros(B, bool),
                              jax.random.PRNGKey(0))
    img = IMG_STEP(model, state, action, jax.random.PRNGKey(1))
    np.testing.assert_allclose(img.deter, prior.deter, atol=1e-6)
    np.testing.assert_allclose(img.logits, prior.logits, atol=1e-6)


# --- observe -------------------------------------------------------------------------------------

def test_observe_equals_obs_step_loop(model, inputs):
    embed, action, is_first = inputs
    key = jax.random.PRNGKey(11)
    post, prior = model.observe(model.initial(B), embed, action, is_first, key)
    assert post.deter.shape == (B, T, 16) and post.logits.shape == (B, T, 4, 3) and post.stoch.shape == (B, T, 4, 3)
    lpost, lprior = loop_obs_step(model, model.initial(B), embed, action, is_first, jax.random.split(key, T))
    assert_state_close(post, lpost)
    assert_state_close(prior, lprior)
    jpost, jprior = OBSERVE(model, model.initial(B), embed, action, is_first, key)
    assert_state_close(jpost, lpost)
    assert_state_close(jprior, lprior)


def test_observe_matches_numpy_unroll(model, inputs):
    """Deter and logits over the whole sequence, stepping the numpy reference with observe's samples."""
    embed, action, is_first = inputs
    post, prior = OBSERVE(model, model.initial(B), embed, action, is_first, jax.random.PRNGKey(12))
    deter, stoch = np.zeros((B, 16)), np.zeros((B, 4, 3))
    first = np.asarray(is_first)
    for t in range(T):
        reset = first[:, t]
        deter = np.where(reset[:, None], 0.0, deter)
        stoch = np.where(reset[:, None, None], 0.0, stoch)
        act = np.where(reset[:, None], 0.0, np_(action[:, t]))
        h, prior_logits, post_logits = np_step(model, deter, stoch, np_(embed[:, t]), act)
        np.testing.assert_allclose(post.deter[:, t], h, atol=1e-4, err_msg=f"step {t}")
        np.testing.assert_allclose(prior.logits[:, t], prior_logits, atol=1e-4, err_msg=f"step {t}")
        np.testing.assert_allclose(post.logits[:, t], post_logits, atol=1e-4, err_msg=f"step {t}")
        deter, stoch = h, np_(post.stoch[:, t])


def test_observe_reset_equals_fresh_sequence(model, inputs):
    """Rows reset at T0 continue exactly like a fresh sequence started at T0 with the same keys."""
    embed, action, is_first = inputs
    key = jax.random.PRNGKey(13)
    keys = jax.random.split(key, T)
    post, prior = OBSERVE(model, model.initial(B), embed, action, is_first, key)
    fresh_first = np.zeros((B, T - T0), bool)
    fresh_first[:, 0] = True
    fpost, fprior = loop_obs_step(model, model.initial(B), embed[:, T0:], action[:, T0:], jnp.asarray(fresh_first),
                                  keys[T0:])
    part = lambda s: jax.tree.map(lambda x: x[:, T0:], s)
    assert_state_close(part(post), fpost, rows=RESET_ROWS)
    assert_state_close(part(prior), fprior, rows=RESET_ROWS)
    # The first half is a fresh sequence too (is_first at 0), observed on its own.
    hpost, hprior = loop_obs_step(model, model.initial(B), embed[:, :T0], action[:, :T0], is_first[:, :T0],
                                  keys[:T0])
    assert_state_close(jax.tree.map(lambda x: x[:, :T0], post), hpost)
    assert_state_close(jax.tree.map(lambda x: x[:, :T0], prior), hprior)
    # Row 1 did not reset, so it must not look like a fresh start (guards against a vacuous test).
    assert np.abs(np.asarray(post.deter[1, T0]) - np.asarray(fpost.deter[1, 0])).max() > 1e-3


def test_deter_after_reset_is_gru_of_zeros(model, inputs):
    """After a reset the deter is GRU(0, 0, 0), whatever came before and whatever the action."""
    embed, action, is_first = inputs
    post, _ = OBSERVE(model, model.initial(B), embed, action, is_first, jax.random.PRNGKey(14))
    h0 = np_gru(model, np.zeros((1, 16)), np.zeros((1, 4, 3)), np.zeros((1, ACT)))[0]
    d = np.asarray(post.deter)
    for row in range(B):
        np.testing.assert_allclose(d[row, 0], h0, atol=1e-5)
    for row in RESET_ROWS:
        np.testing.assert_allclose(d[row, T0], h0, atol=1e-5)
    assert np.abs(d[1, T0] - h0).max() > 1e-3


def test_reset_forgets_start_state_and_action(model, inputs):
    embed, action, _ = inputs
    first = np.zeros((B, T), bool)
    first[RESET_ROWS, T0] = True  # no reset at step 0: the start state matters until T0
    is_first = jnp.asarray(first)
    key = jax.random.PRNGKey(15)
    k = jax.random.split(jax.random.PRNGKey(16), 2)
    start = RSSMState(jax.random.normal(k[0], (B, 16)), jax.nn.one_hot(jnp.full((B, 4), 2), 3),
                      jnp.zeros((B, 4, 3)))
    post_a, prior_a = OBSERVE(model, model.initial(B), embed, action, is_first, key)
    other_action = action.at[:, T0].set(-action[:, T0] + 1.0)
    post_b, prior_b = OBSERVE(model, start, embed, other_action, is_first, key)
    assert_state_close(post_a, post_b, rows=RESET_ROWS, steps=slice(T0, None))
    assert_state_close(prior_a, prior_b, rows=RESET_ROWS, steps=slice(T0, None))
    # Before the reset, and on the row without one, the start state and the action do matter.
    assert np.abs(np.asarray(post_a.deter[:, 0] - post_b.deter[:, 0])).max() > 1e-3
    assert np.abs(np.asarray(post_a.deter[1, T0] - post_b.deter[1, T0])).max() > 1e-3


# --- KL loss -------------------------------------------------------------------------------------

PRIOR_LOGITS = np.array([[[0.1, -0.3, 0.4], [1.0, 0.0, -1.0], [0.2, 0.2, 0.2], [-0.5, 0.3, 0.0]],
                         [[2.0, -1.0, 0.0], [0.0, 0.5, -0.5], [1.5, -1.5, 0.3], [0.0, 0.0, 1.0]]], np.float32)
NEAR = PRIOR_LOGITS + np.array([0.1, -0.1, 0.05], np.float32)  # KL sum far below 1 nat
FAR = np.array([[[4.0, -4.0, 0.0], [-3.0, 3.0, 0.0], [0.0, -4.0, 4.0], [5.0, 0.0, -5.0]],
                [[-4.0, 4.0, 0.0], [3.0, -3.0, 1.0], [-3.0, 3.0, 0.0], [4.0, 0.0, -4.0]]], np.float32)


def make_state(logits):
    logits = jnp.asarray(logits)
    return RSSMState(jnp.zeros((logits.shape[0], 16)), jnp.zeros_like(logits), logits)


def test_kl_test_data_straddles_free_bits():
    assert np.all(np_kl_sum(NEAR, PRIOR_LOGITS) < 0.1)
    assert np.all(np_kl_sum(FAR, PRIOR_LOGITS) > 2.0)
    assert np.all(np_kl_sum(PRIOR_LOGITS, FAR) > 2.0)


def test_kl_loss_below_free_bits_is_exactly_free(model):
    dyn, rep = model.kl_loss(make_state(NEAR), make_state(PRIOR_LOGITS), 1.0)
    assert dyn.shape == (2,) and rep.shape == (2,)
    assert np.all(np.asarray(dyn) == 1.0) and np.all(np.asarray(rep) == 1.0)


def test_kl_loss_above_free_bits_is_kl_sum(model):
    dyn, rep = model.kl_loss(make_state(FAR), make_state(PRIOR_LOGITS), 1.0)
    expected = np_kl_sum(FAR, PRIOR_LOGITS)  # KL(post || prior), not KL(prior || post)
    np.testing.assert_allclose(dyn, expected, rtol=1e-5)
    np.testing.assert_allclose(rep, expected, rtol=1e-5)
    assert np.abs(expected - np_kl_sum(PRIOR_LOGITS, FAR)).max() > 0.1


def test_kl_loss_mixed_rows(model):
    post = np.stack([NEAR[0], FAR[1]])
    dyn, rep = model.kl_loss(make_state(post), make_state(PRIOR_LOGITS), 1.0)
    expected = [1.0, np_kl_sum(FAR[1:], PRIOR_LOGITS[1:])[0]]
    np.testing.assert_allclose(dyn, expected, rtol=1e-5)
    np.testing.assert_allclose(rep, expected, rtol=1e-5)


def test_kl_loss_over_time_axis(model):
    post = jnp.stack([jnp.asarray(FAR), jnp.asarray(NEAR)], 1)  # [2, 2, 4, 3]
    prior = jnp.stack([jnp.asarray(PRIOR_LOGITS)] * 2, 1)
    s = lambda l: RSSMState(jnp.zeros((2, 2, 16)), jnp.zeros_like(l), l)
    dyn, rep = model.kl_loss(s(post), s(prior), 1.0)
    assert dyn.shape == (2, 2)
    np.testing.assert_allclose(dyn[:, 0], np_kl_sum(FAR, PRIOR_LOGITS), rtol=1e-5)
    np.testing.assert_allclose(dyn[:, 1], 1.0)


def test_kl_loss_balancing_gradients(model):
    post_l, prior_l = jnp.asarray(FAR), jnp.asarray(PRIOR_LOGITS)

    def dyn(po, pr):
        return jnp.sum(model.kl_loss(make_state(po), make_state(pr), 1.0)[0])

    def rep(po, pr):
        return jnp.sum(model.kl_loss(make_state(po), make_state(pr), 1.0)[1])

    d_dyn_post, d_dyn_prior = jax.grad(dyn, argnums=(0, 1))(post_l, prior_l)
    d_rep_post, d_rep_prior = jax.grad(rep, argnums=(0, 1))(post_l, prior_l)
    assert np.all(np.asarray(d_dyn_post) == 0.0)  # dyn trains only the prior
    assert np.all(np.asarray(d_rep_prior) == 0.0)  # rep trains only the posterior
    assert np.abs(np.asarray(d_dyn_prior)).max() > 1e-2
    assert np.abs(np.asarray(d_rep_post)).max() > 1e-2
    # d KL(p || q) / d q_logits = q - p (per latent): the prior is pulled towards the posterior.
    softmax = lambda l: np.exp(l - l.max(-1, keepdims=True)) / np.exp(l - l.max(-1, keepdims=True)).sum(-1, keepdims=True)
    np.testing.assert_allclose(d_dyn_prior, softmax(np_(PRIOR_LOGITS)) - softmax(np_(FAR)), atol=1e-5)


def test_kl_loss_below_free_bits_has_no_gradient(model):
    g = jax.grad(lambda pr: jnp.sum(model.kl_loss(make_state(NEAR), make_state(pr), 1.0)[0]))(
        jnp.asarray(PRIOR_LOGITS))
    assert np.all(np.asarray(g) == 0.0)


def test_entry_round_trip(model, inputs):
    """Replay keeps a posterior as float16 deter + class indices; restoring gives the same one-hot
    sample (the straight-through sum is one-hot up to 1-ulp rounding) and the deter within float16
    rounding (|h| < 1: at most 2^-12)."""
    embed, action, is_first = inputs
    post, _ = OBSERVE(model, model.initial(B), embed, action, is_first, jax.random.PRNGKey(15))
    entry = model.entry(post)
    assert {k: (v.shape, v.dtype) for k, v in entry.items()} == {
        "deter": ((B, T, CFG.deter), jnp.float16), "stoch": ((B, T, CFG.stoch), jnp.uint8)}
    assert model.entry_spec() == {"deter": ((CFG.deter,), "float16"), "stoch": ((CFG.stoch,), "uint8")}
    back = model.from_entry(entry)
    np.testing.assert_allclose(np.asarray(back.stoch), np.asarray(post.stoch), atol=1e-6)
    err = np.abs(np.asarray(back.deter) - np.asarray(post.deter))
    assert err.max() <= 2.0 ** -12 and np.abs(np.asarray(post.deter)).max() < 1.0
