"""Tests for worldmodels.actor_critic: lambda returns, the percentile return normaliser, actor and critic."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldmodels.actor_critic import (Actor, ActorCriticConfig, Critic, lambda_return, return_norm_init,
                                      return_norm_scale, return_norm_update)
from worldmodels.dists import BoundedNormal, OneHotCategorical

TINY = ActorCriticConfig(units=8, layers=1, retnorm_debias=True)

# --- lambda returns --------------------------------------------------------------------------------

REWARD = [1.0, 2.0, 3.0]
DISCOUNT = [0.9, 0.5, 0.8]
NEXT_VALUE = [10.0, 20.0, 30.0]


def hand_lambda_return():
    """By hand, lam = 0.75, from R_t = r_t + d_t((1 - lam) v_{t+1} + lam R_{t+1}) with R_3 = v_3 = 30:

    R_2 = 3 + 0.8 * (0.25 * 30 + 0.75 * 30)       = 3 + 24              = 27
    R_1 = 2 + 0.5 * (0.25 * 20 + 0.75 * 27)       = 2 + 0.5 * 25.25     = 14.625
    R_0 = 1 + 0.9 * (0.25 * 10 + 0.75 * 14.625)   = 1 + 0.9 * 13.46875  = 13.121875
    """
    return [13.121875, 14.625, 27.0]


@pytest.mark.parametrize("jit", [False, True])
def test_lambda_return_hand_trajectory(jit):
    fn = jax.jit(lambda_return, static_argnums=3) if jit else lambda_return
    ret = fn(jnp.array(REWARD), jnp.array(DISCOUNT), jnp.array(NEXT_VALUE), 0.75)
    np.testing.assert_allclose(ret, hand_lambda_return(), rtol=1e-6)


def test_lambda_zero_is_one_step_td():
    # R_t = r_t + d_t v_{t+1}: [1 + 0.9 * 10, 2 + 0.5 * 20, 3 + 0.8 * 30]
    ret = lambda_return(jnp.array(REWARD), jnp.array(DISCOUNT), jnp.array(NEXT_VALUE), 0.0)
    np.testing.assert_allclose(ret, [10.0, 12.0, 27.0], rtol=1e-6)


def test_lambda_one_undiscounted_is_reward_sum_plus_last_value():
    # R_t = sum_{k >= t} r_k + v_3: [6 + 30, 5 + 30, 3 + 30]; intermediate values are ignored.
    ret = lambda_return(jnp.array(REWARD), jnp.ones(3), jnp.array([-99.0, 55.0, 30.0]), 1.0)
    np.testing.assert_allclose(ret, [36.0, 35.0, 33.0], rtol=1e-6)


def test_lambda_return_zero_discount_cuts_bootstrap():
    # A terminal at step 1 (d_1 = 0): R_1 = r_1 exactly, whatever comes after.
    ret = lambda_return(jnp.array(REWARD), jnp.array([0.9, 0.0, 0.8]), jnp.array(NEXT_VALUE), 0.75)
    # R_0 = 1 + 0.9 * (0.25 * 10 + 0.75 * 2) = 4.6
    np.testing.assert_allclose(ret, [4.6, 2.0, 27.0], rtol=1e-6)


def np_lambda_return(r, d, v, lam):
    """Plain python loop over the last axis."""
    r, d, v = (np.asarray(a, np.float64) for a in (r, d, v))
    out = np.zeros_like(r)
    nxt = v[..., -1]
    for t in reversed(range(r.shape[-1])):
        nxt = r[..., t] + d[..., t] * ((1 - lam) * v[..., t] + lam * nxt)
        out[..., t] = nxt
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_lambda_return_batched(jit):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    r = jax.random.normal(keys[0], (4, 2, 6))
    d = jax.random.uniform(keys[1], (4, 2, 6))
    v = jax.random.normal(keys[2], (4, 2, 6)) * 5
    fn = jax.jit(lambda_return, static_argnums=3) if jit else lambda_return
    ret = fn(r, d, v, 0.95)
    assert ret.shape == (4, 2, 6)
    np.testing.assert_allclose(ret, np_lambda_return(r, d, v, 0.95), rtol=1e-5, atol=1e-5)
    # The batch row that holds the hand trajectory gives the hand numbers.
    rb = jnp.stack([jnp.array(REWARD), jnp.zeros(3)])
    db = jnp.stack([jnp.array(DISCOUNT), jnp.ones(3)])
    vb = jnp.stack([jnp.array(NEXT_VALUE), jnp.full(3, 7.0)])  # r = 0, d = 1, v = 7 -> R = 7
    np.testing.assert_allclose(fn(rb, db, vb, 0.75), [hand_lambda_return(), [7.0, 7.0, 7.0]], rtol=1e-6)


# --- return normaliser ------------------------------------------------------------------------------

def debiased(state):
    return float(state.low) / float(state.correction), float(state.high) / float(state.correction)


@pytest.mark.parametrize("rate", [0.01, 0.5])
def test_return_norm_one_update_is_batch_percentiles(rate):
    cfg = dataclasses.replace(TINY, retnorm_rate=rate)
    returns = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (8, 16)) * 3 + 1)
    state = return_norm_update(return_norm_init(), jnp.asarray(returns), cfg)
    low, high = debiased(state)
    np.testing.assert_allclose(low, np.percentile(returns, 5), rtol=1e-4)
    np.testing.assert_allclose(high, np.percentile(returns, 95), rtol=1e-4)
    np.testing.assert_allclose(return_norm_scale(state, cfg), max(1.0, high - low), rtol=1e-4)


def test_return_norm_two_updates_hand_ema():
    cfg = dataclasses.replace(TINY, retnorm_rate=0.5)
    a = np.arange(101, dtype=np.float32)  # P5 = 5, P95 = 95
    b = np.linspace(0, 20, 101).astype(np.float32)  # P5 = 1, P95 = 19
    state = return_norm_update(return_norm_update(return_norm_init(), jnp.asarray(a), cfg), jnp.asarray(b), cfg)
    # low = 0.25 * 5 + 0.5 * 1 = 1.75, high = 0.25 * 95 + 0.5 * 19 = 33.25, correction = 1 - 0.5^2 = 0.75
    np.testing.assert_allclose([state.low, state.high, state.correction], [1.75, 33.25, 0.75], rtol=1e-5)
    low, high = debiased(state)
    np.testing.assert_allclose([low, high], [7 / 3, 133 / 3], rtol=1e-5)
    np.testing.assert_allclose(return_norm_scale(state, cfg), 126 / 3, rtol=1e-5)  # 44.333 - 2.333 = 42


def test_return_norm_without_debiasing_is_the_plain_ema():
    # The reference's default: the EMAs start at zero and are used as they are.
    cfg = dataclasses.replace(TINY, retnorm_rate=0.5, retnorm_debias=False)
    a = np.arange(101, dtype=np.float32)
    b = np.linspace(0, 20, 101).astype(np.float32)
    state = return_norm_update(return_norm_update(return_norm_init(), jnp.asarray(a), cfg), jnp.asarray(b), cfg)
    np.testing.assert_allclose(return_norm_scale(state, cfg), 33.25 - 1.75, rtol=1e-5)
    one = return_norm_update(return_norm_init(), jnp.asarray(a), dataclasses.replace(cfg, retnorm_rate=0.01))
    assert float(return_norm_scale(one, dataclasses.replace(cfg, retnorm_rate=0.01))) == 1.0  # 0.9 < limit


def test_return_norm_scale_floor_and_range():
    cfg = TINY
    small = return_norm_update(return_norm_init(), jnp.linspace(0.0, 0.5, 50), cfg)
    assert float(return_norm_scale(small, cfg)) == 1.0
    wide = return_norm_update(return_norm_init(), jnp.arange(101.0), cfg)
    np.testing.assert_allclose(return_norm_scale(wide, cfg), 90.0, rtol=1e-4)
    # Before any update the scale is the floor, not a division by zero.
    assert float(return_norm_scale(return_norm_init(), cfg)) == 1.0


def test_return_norm_jit_matches_eager():
    cfg = TINY
    x = jnp.arange(101.0) * 2
    eager = return_norm_update(return_norm_init(), x, cfg)
    jitted = jax.jit(lambda s, r: return_norm_update(s, r, cfg))(return_norm_init(), x)
    np.testing.assert_allclose(jnp.stack(jitted), jnp.stack(eager), rtol=1e-6)


# --- actor and critic ---------------------------------------------------------------------------------

def test_discrete_actor():
    actor = Actor(7, 5, True, TINY, key=jax.random.PRNGKey(0))
    dist = actor(jax.random.normal(jax.random.PRNGKey(1), (3, 4, 7)))
    assert isinstance(dist, OneHotCategorical)
    assert dist.logits.shape == (3, 4, 5)
    probs = np.asarray(dist.probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert probs.min() >= 0.01 / 5 * (1 - 1e-5)  # unimix floor
    sample = np.asarray(dist.sample(jax.random.PRNGKey(2)))
    assert sample.shape == (3, 4, 5)
    np.testing.assert_allclose(np.sort(sample, -1), np.broadcast_to([0, 0, 0, 0, 1.0], (3, 4, 5)), atol=1e-6)


def test_continuous_actor():
    actor = Actor(7, 2, False, TINY, key=jax.random.PRNGKey(0))
    feat = jax.random.normal(jax.random.PRNGKey(1), (3, 7)) * 100
    dist = actor(feat)
    assert isinstance(dist, BoundedNormal)
    assert dist.mean_.shape == (3, 2) and dist.std.shape == (3, 2)
    assert np.all(np.abs(np.asarray(dist.mean_)) <= 1)
    assert np.all((np.asarray(dist.std) >= 0.1) & (np.asarray(dist.std) <= 1.0))
    assert dist.sample(jax.random.PRNGKey(2)).shape == (3, 2)
    assert dist.log_prob(jnp.zeros((3, 2))).shape == (3,)


def test_fresh_critic_predicts_zero():
    critic = Critic(7, TINY, key=jax.random.PRNGKey(0))
    feat = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 7))
    dist = critic(feat)
    assert dist.logits.shape == (4, 3, 255)
    assert np.all(np.asarray(dist.logits) == 0.0)
    mean = np.asarray(dist.mean())
    assert mean.shape == (4, 3)
    assert np.all(mean == 0.0)


def test_fresh_critic_predicts_zero_under_jit():
    critic = Critic(7, TINY, key=jax.random.PRNGKey(0))
    feat = jax.random.normal(jax.random.PRNGKey(1), (4, 7))
    mean = np.asarray(jax.jit(lambda c, f: c(f).mean())(critic, feat))
    assert np.all(mean == 0.0), mean


def test_lambda_return_with_per_step_lambda_stops_recursion():
    # lam_t = 0 at t = 1 (an episode boundary): R_1 must not look past v_2.
    # R_3 = 30; R_2 = 3 + 0.9 * (0.5 * 30 + 0.5 * 30) = 30; R_1 = 2 + 0.9 * 20 = 20;
    # R_0 = 1 + 0.9 * (0.5 * 10 + 0.5 * 20) = 14.5
    got = lambda_return(jnp.array([1.0, 2.0, 3.0]), jnp.full(3, 0.9), jnp.array([10.0, 20.0, 30.0]),
                        jnp.array([0.5, 0.0, 0.5]))
    np.testing.assert_allclose(got, [14.5, 20.0, 30.0], rtol=1e-6)
