"""Tests for worldmodels.dists against hand-computed numbers and plain numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldmodels.dists import (Bernoulli, BoundedNormal, OneHotCategorical, TwoHot, symexp, symexp_bins, symlog,
                               twohot_encode)


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def np_twohot(x, bins):
    """Independent twohot: find the bracketing pair with a python loop; outside -> the end bin."""
    bins = np.asarray(bins, np.float64)
    out = np.zeros(len(bins))
    if x <= bins[0]:
        out[0] = 1.0
        return out
    if x >= bins[-1]:
        out[-1] = 1.0
        return out
    for i in range(len(bins) - 1):
        if bins[i] <= x < bins[i + 1]:
            width = bins[i + 1] - bins[i]
            out[i] = (bins[i + 1] - x) / width
            out[i + 1] = (x - bins[i]) / width
            return out
    raise AssertionError("unreachable")


# --- symlog / symexp -------------------------------------------------------------------------------

def test_symlog_hand_values():
    x = jnp.array([0.0, math.e - 1, -(math.e - 1), math.e**2 - 1, -(math.e**3 - 1)])
    np.testing.assert_allclose(symlog(x), [0.0, 1.0, -1.0, 2.0, -3.0], rtol=1e-6, atol=1e-7)


def test_symexp_hand_values():
    x = jnp.array([0.0, 1.0, -1.0, 3.0])
    np.testing.assert_allclose(symexp(x), [0.0, math.e - 1, -(math.e - 1), math.e**3 - 1], rtol=1e-6)


def test_symlog_symexp_inverse():
    x = jnp.array([-1e6, -1234.5, -7.0, -0.3, -1e-4, 0.0, 1e-4, 0.3, 7.0, 1234.5, 1e6])
    np.testing.assert_allclose(symexp(symlog(x)), x, rtol=1e-5)
    y = jnp.array([-15.0, -2.0, -0.1, 0.0, 0.1, 2.0, 15.0])
    np.testing.assert_allclose(symlog(symexp(y)), y, rtol=1e-5, atol=1e-7)


# --- bins ----------------------------------------------------------------------------------------

def test_symexp_bins_layout():
    bins = np.asarray(symexp_bins(255))
    assert bins.shape == (255,)
    assert bins[127] == 0.0  # exact zero in the middle
    np.testing.assert_array_equal(bins, -bins[::-1])  # exactly symmetric
    assert np.all(np.diff(bins) > 0)
    np.testing.assert_allclose(bins[-1], math.expm1(20.0), rtol=1e-6)
    np.testing.assert_allclose(bins[0], -math.expm1(20.0), rtol=1e-6)
    # Equally spaced in symlog space: step 40 / 254.
    np.testing.assert_allclose(bins[128], math.expm1(40 / 254), rtol=1e-5)
    np.testing.assert_allclose(np.sign(bins) * np.log1p(np.abs(bins)), np.linspace(-20, 20, 255), atol=1e-4)


def test_symexp_bins_rejects_even():
    with pytest.raises(ValueError):
        symexp_bins(254)


# --- twohot encode -------------------------------------------------------------------------------

SMALL_BINS = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])


@pytest.mark.parametrize("x, expected", [
    (0.0, [0, 0, 1, 0, 0]),
    (1.0, [0, 0, 0, 1, 0]),
    (-2.0, [1, 0, 0, 0, 0]),
    (2.0, [0, 0, 0, 0, 1]),
    (0.25, [0, 0, 0.75, 0.25, 0]),
    (-1.8, [0.8, 0.2, 0, 0, 0]),
    (1.5, [0, 0, 0, 0.5, 0.5]),
])
def test_twohot_small_bins_hand(x, expected):
    np.testing.assert_allclose(twohot_encode(jnp.array(x), SMALL_BINS), expected, atol=1e-6)


@pytest.mark.parametrize("x", [2.5, 100.0])
def test_twohot_beyond_top_goes_to_last_bin(x):
    np.testing.assert_allclose(twohot_encode(jnp.array(x), SMALL_BINS), [0, 0, 0, 0, 1], atol=1e-7)


@pytest.mark.parametrize("x", [-2.5, -100.0])
def test_twohot_beyond_bottom_goes_to_first_bin(x):
    np.testing.assert_allclose(twohot_encode(jnp.array(x), SMALL_BINS), [1, 0, 0, 0, 0], atol=1e-7)


def test_twohot_255_on_bin_and_between():
    bins = symexp_bins(255)
    enc = np.asarray(twohot_encode(bins[jnp.array([0, 127, 130, 254])], bins))
    for row, idx in zip(enc, [0, 127, 130, 254]):
        expected = np.zeros(255)
        expected[idx] = 1.0
        np.testing.assert_allclose(row, expected, atol=1e-6)
    # A quarter of the way from bin 127 (= 0) to bin 128 (= expm1(40/254)).
    b128 = math.expm1(40 / 254)
    enc = np.asarray(twohot_encode(jnp.array(0.25 * b128), bins))
    expected = np.zeros(255)
    expected[127], expected[128] = 0.75, 0.25
    np.testing.assert_allclose(enc, expected, atol=1e-5)


def test_twohot_255_beyond_ends():
    bins = symexp_bins(255)
    enc = np.asarray(twohot_encode(jnp.array([1e9, -1e9]), bins))
    top, bottom = np.zeros(255), np.zeros(255)
    top[-1], bottom[0] = 1.0, 1.0
    np.testing.assert_allclose(enc[0], top, atol=1e-7)
    np.testing.assert_allclose(enc[1], bottom, atol=1e-7)


def test_twohot_batched_matches_loop_reference():
    bins = symexp_bins(255)
    xs = np.array([[0.0, 0.3, -7.0], [1234.5, -0.001, 55.5]], np.float32)
    enc = np.asarray(twohot_encode(jnp.asarray(xs), bins))
    assert enc.shape == (2, 3, 255)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(enc[i, j], np_twohot(xs[i, j], np.asarray(bins)), atol=1e-4)
    np.testing.assert_allclose(enc.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("x", [0.0, 0.3, -7.0, 1234.5])
def test_twohot_round_trip(x):
    bins = symexp_bins(255)
    enc = twohot_encode(jnp.array(x, jnp.float32), bins)
    np.testing.assert_allclose(float(jnp.sum(enc * bins)), x, rtol=1e-5, atol=1e-6)
    mean = TwoHot(jnp.log(enc + 1e-30), bins).mean()
    np.testing.assert_allclose(float(mean), x, rtol=1e-5, atol=1e-6)


# --- TwoHot ----------------------------------------------------------------------------------------

def test_twohot_zero_logits_mean_exactly_zero():
    bins = symexp_bins(255)
    mean = TwoHot(jnp.zeros((3, 255)), bins).mean()
    assert mean.shape == (3,)
    assert np.all(np.asarray(mean) == 0.0)


def test_twohot_zero_logits_mean_exactly_zero_under_jit():
    # Training runs jitted; the zero-initialised reward/value heads must predict exactly 0 there too.
    bins = symexp_bins(255)
    mean = jax.jit(lambda l: TwoHot(l, bins).mean())(jnp.zeros((3, 255)))
    assert np.all(np.asarray(mean) == 0.0), mean


def test_twohot_mean_matches_numpy():
    bins = symexp_bins(255)
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 255)) * 3.0
    expected = (np.exp(np_log_softmax(logits)) * np.asarray(bins, np.float64)).sum(-1)
    np.testing.assert_allclose(TwoHot(logits, bins).mean(), expected, rtol=1e-4, atol=1e-3)


def test_twohot_log_prob_is_cross_entropy():
    bins = symexp_bins(255)
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 255))
    targets = np.array([0.3, -7.0, 1234.5], np.float32)
    logp = np_log_softmax(logits)
    expected = [np.sum(np_twohot(t, np.asarray(bins)) * logp[i]) for i, t in enumerate(targets)]
    np.testing.assert_allclose(TwoHot(logits, bins).log_prob(jnp.asarray(targets)), expected, rtol=1e-4)


def test_twohot_log_prob_small_hand():
    # logits log([1, 2, 3, 4, 10]) / 20 -> probs [0.05, 0.1, 0.15, 0.2, 0.5]; target 0.25 -> 0.75 / 0.25.
    logits = jnp.log(jnp.array([1.0, 2.0, 3.0, 4.0, 10.0]))
    expected = 0.75 * math.log(0.15) + 0.25 * math.log(0.2)
    np.testing.assert_allclose(TwoHot(logits, SMALL_BINS).log_prob(jnp.array(0.25)), expected, rtol=1e-6)


def test_twohot_log_prob_gradient_moves_mean_to_target():
    # The target encoding is a stop-gradient constant: d/dlogits = enc - softmax(logits).
    bins = symexp_bins(255)
    logits = jnp.zeros(255)
    grad = jax.grad(lambda l: TwoHot(l, bins).log_prob(jnp.array(5.0)))(logits)
    enc = np_twohot(5.0, np.asarray(bins))
    np.testing.assert_allclose(grad, enc - 1 / 255, atol=1e-5)


# --- OneHotCategorical -------------------------------------------------------------------------------

def test_unimix_probs_hand_values():
    dist = OneHotCategorical.from_logits(jnp.log(jnp.array([1.0, 2.0, 3.0, 4.0])), unimix=0.01)
    # 0.99 * [0.1, 0.2, 0.3, 0.4] + 0.01 / 4
    np.testing.assert_allclose(dist.probs, [0.1015, 0.2005, 0.2995, 0.3985], rtol=1e-5)
    np.testing.assert_allclose(jnp.exp(dist.logits), [0.1015, 0.2005, 0.2995, 0.3985], rtol=1e-5)


def test_unimix_floor_on_extreme_logits():
    dist = OneHotCategorical.from_logits(jnp.array([100.0, -100.0, -100.0, -100.0]), unimix=0.01)
    probs = np.asarray(dist.probs)
    assert probs.min() >= 0.01 / 4 * (1 - 1e-5)
    np.testing.assert_allclose(probs, [0.9925, 0.0025, 0.0025, 0.0025], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(dist.logits)))


def test_no_unimix_is_plain_softmax():
    logits = jnp.array([0.5, -1.0, 2.0])
    expected = np.exp(np_log_softmax(logits))
    np.testing.assert_allclose(OneHotCategorical.from_logits(logits, unimix=0.0).probs, expected, rtol=1e-6)


def test_sample_is_one_hot_and_follows_probs():
    dist = OneHotCategorical.from_logits(jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4])), unimix=0.0)
    samples = jax.vmap(dist.sample)(jax.random.split(jax.random.PRNGKey(0), 4000))
    s = np.asarray(samples)
    assert s.shape == (4000, 4)
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.sort(s, -1)[:, :-1], 0.0, atol=1e-6)
    np.testing.assert_allclose(s.max(-1), 1.0, atol=1e-6)
    # Frequencies within ~5 standard errors of [0.1, 0.2, 0.3, 0.4].
    np.testing.assert_allclose(s.mean(0), [0.1, 0.2, 0.3, 0.4], atol=0.04)


def test_sample_straight_through_gradient():
    raw = jnp.array([[0.3, -1.2, 2.0, 0.1], [1.0, 1.0, -0.5, 0.0]])
    w = jnp.array([[1.0, -2.0, 0.5, 3.0], [0.2, 0.7, -1.0, 2.0]])
    key = jax.random.PRNGKey(3)

    def via_sample(l):
        return jnp.sum(OneHotCategorical.from_logits(l, 0.01).sample(key) * w)

    def via_probs(l):
        return jnp.sum(OneHotCategorical.from_logits(l, 0.01).probs * w)

    g_sample = jax.grad(via_sample)(raw)
    g_probs = jax.grad(via_probs)(raw)
    np.testing.assert_allclose(g_sample, g_probs, rtol=1e-5, atol=1e-7)
    # Closed form: d/dl sum(w * (0.99 softmax(l) + c)) = 0.99 * p * (w - <p, w>).
    p = np.exp(np_log_softmax(raw))
    wn = np.asarray(w, np.float64)
    expected = 0.99 * p * (wn - (p * wn).sum(-1, keepdims=True))
    np.testing.assert_allclose(g_sample, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(g_sample)).max() > 1e-2  # the gradient is not trivially zero


def test_mode_is_argmax_one_hot():
    dist = OneHotCategorical.from_logits(jnp.array([[0.1, 3.0, -1.0], [5.0, 0.0, 0.0]]))
    np.testing.assert_allclose(dist.mode(), [[0, 1, 0], [1, 0, 0]], atol=1e-6)


def test_categorical_entropy_log_prob_kl_event_dims_1():
    lp = jnp.array([[0.3, -1.2, 2.0, 0.1], [1.0, 1.0, -0.5, 0.0]])
    lq = jnp.array([[-0.3, 0.2, 1.0, 0.5], [0.0, 2.0, 0.5, -1.0]])
    p, q = OneHotCategorical(lp), OneHotCategorical(lq)
    logp, logq = np_log_softmax(lp), np_log_softmax(lq)
    np.testing.assert_allclose(p.entropy(), -(np.exp(logp) * logp).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(p.kl(q), (np.exp(logp) * (logp - logq)).sum(-1), rtol=1e-5)
    onehot = np.array([[0, 0, 1, 0], [0, 1, 0, 0]], np.float32)
    np.testing.assert_allclose(p.log_prob(jnp.asarray(onehot)), [logp[0, 2], logp[1, 1]], rtol=1e-5)


def test_categorical_event_dims_2_sums_over_latents():
    lp = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4)) * 2
    lq = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4)) * 2
    p, q = OneHotCategorical(lp, 2), OneHotCategorical(lq, 2)
    logp, logq = np_log_softmax(lp), np_log_softmax(lq)
    ent = np.zeros(2)
    kl = np.zeros(2)
    for b in range(2):
        for n in range(3):
            ent[b] -= sum(math.exp(logp[b, n, k]) * logp[b, n, k] for k in range(4))
            kl[b] += sum(math.exp(logp[b, n, k]) * (logp[b, n, k] - logq[b, n, k]) for k in range(4))
    assert p.entropy().shape == (2,)
    np.testing.assert_allclose(p.entropy(), ent, rtol=1e-5)
    np.testing.assert_allclose(p.kl(q), kl, rtol=1e-4)
    idx = np.array([[0, 3, 1], [2, 2, 0]])
    onehot = np.eye(4, dtype=np.float32)[idx]
    expected = [sum(logp[b, n, idx[b, n]] for n in range(3)) for b in range(2)]
    np.testing.assert_allclose(p.log_prob(jnp.asarray(onehot)), expected, rtol=1e-5)
    np.testing.assert_allclose(p.kl(p), 0.0, atol=1e-6)


# --- BoundedNormal -------------------------------------------------------------------------------

def test_bounded_normal_ranges():
    raw = jnp.array([-100.0, -3.0, 0.0, 3.0, 100.0])
    d = BoundedNormal.from_outputs(raw, raw, minstd=0.1, maxstd=1.0)
    mean, std = np.asarray(d.mean_), np.asarray(d.std)
    assert np.all(mean >= -1) and np.all(mean <= 1)
    assert np.all(std >= 0.1) and np.all(std <= 1.0)
    np.testing.assert_allclose(mean, np.tanh([-100.0, -3.0, 0.0, 3.0, 100.0]), rtol=1e-6)
    np.testing.assert_allclose(std[2], 0.9 / (1 + math.exp(-2.0)) + 0.1, rtol=1e-6)
    np.testing.assert_allclose(std[[0, 4]], [0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(d.mode(), mean)


def test_bounded_normal_log_prob_and_entropy():
    d = BoundedNormal(jnp.array([[0.5, -0.2]]), jnp.array([[0.3, 0.8]]))
    x = jnp.array([[0.1, 0.4]])
    expected = sum(-0.5 * ((xi - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
                   for xi, m, s in [(0.1, 0.5, 0.3), (0.4, -0.2, 0.8)])
    np.testing.assert_allclose(d.log_prob(x), [expected], rtol=1e-5)
    ent = sum(0.5 * math.log(2 * math.pi * math.e * s * s) for s in [0.3, 0.8])
    np.testing.assert_allclose(d.entropy(), [ent], rtol=1e-5)


def test_bounded_normal_sample_statistics():
    d = BoundedNormal(jnp.array([0.5, -0.2]), jnp.array([0.3, 0.8]))
    s = np.asarray(jax.vmap(d.sample)(jax.random.split(jax.random.PRNGKey(0), 5000)))
    assert s.shape == (5000, 2)
    np.testing.assert_allclose(s.mean(0), [0.5, -0.2], atol=0.05)
    np.testing.assert_allclose(s.std(0), [0.3, 0.8], rtol=0.06)


# --- Bernoulli -----------------------------------------------------------------------------------

def test_bernoulli_soft_targets():
    logit = jnp.array([0.7, -2.0, 0.0])
    x = jnp.array([0.3, 1.0, 0.5])
    sig = lambda v: 1 / (1 + math.exp(-v))
    expected = [0.3 * math.log(sig(0.7)) + 0.7 * math.log(1 - sig(0.7)), math.log(sig(-2.0)), math.log(0.5)]
    d = Bernoulli(logit)
    np.testing.assert_allclose(d.log_prob(x), expected, rtol=1e-5)
    np.testing.assert_allclose(d.mean(), [sig(0.7), sig(-2.0), 0.5], rtol=1e-6)
    np.testing.assert_array_equal(d.mode(), [1.0, 0.0, 0.0])


def test_bernoulli_extreme_logits_finite():
    d = Bernoulli(jnp.array([100.0, -100.0]))
    lp = np.asarray(d.log_prob(jnp.array([1.0, 0.0])))
    np.testing.assert_allclose(lp, 0.0, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(d.log_prob(jnp.array([0.0, 1.0])))))


def test_twohot_log_prob_of_a_nan_target_is_nan():
    """A NaN target must not pick clipped bins with finite weights: the loss stays NaN, which the
    train step's non-finite guard then skips (a NaN reward used to train the reward head on garbage)."""
    dist = TwoHot(jnp.linspace(-1.0, 1.0, 3 * 255).reshape(3, 255), symexp_bins(255))
    with_nan = dist.log_prob(jnp.array([1.0, jnp.nan, -2.0]))
    finite = dist.log_prob(jnp.array([1.0, 0.0, -2.0]))
    assert np.isnan(float(with_nan[1]))
    np.testing.assert_array_equal(np.asarray(with_nan)[[0, 2]], np.asarray(finite)[[0, 2]])
    assert np.all(np.isfinite(np.asarray(finite)))
