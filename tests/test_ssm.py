"""Tests for worldmodels.sequence.ssm: HiPPO init, discretisation, the reset-aware parallel scan, SSM.

Truth comes from hand-written matrices, closed forms in numpy complex arithmetic and a plain numpy
python loop of the recurrence x_t = Abar * (x_init if is_first_t else x_{t-1}) + bu_t. The three
reset bugs of the published R2I code (see shared/reference/r2i.md) each have a regression test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldmodels.sequence.ssm import (SSM, discretize, hippo_init, hippo_legs, hippo_legs_diagonal, scan_parallel,
                                      scan_sequential)

B, P = 3, 6
LENGTHS = (17, 32)  # a non-power of two and a power of two: the only scan shapes used

SCAN_PAR = jax.jit(scan_parallel)
SCAN_SEQ = jax.jit(scan_sequential)


# --- HiPPO ------------------------------------------------------------------------------------------

def test_hippo_legs_4_is_the_hand_written_matrix():
    s3, s5, s7, s15, s21, s35 = (math.sqrt(v) for v in (3, 5, 7, 15, 21, 35))
    expected = -np.array([[1, 0, 0, 0],
                          [s3, 2, 0, 0],
                          [s5, s15, 3, 0],
                          [s7, s21, s35, 4]])
    np.testing.assert_allclose(hippo_legs(4), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [4, 16, 64])
def test_hippo_legs_diagonal_is_an_eigendecomposition_of_the_normal_part(n):
    lam, v = hippo_legs_diagonal(n)
    assert lam.shape == (n,) and v.shape == (n, n)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-6)
    # S = A + P P^T with P_i = sqrt(i + 1/2), written out independently of the library.
    i = np.arange(n)
    p = np.sqrt(i + 0.5)
    a = np.zeros((n, n))
    for r in range(n):
        for c in range(n):
            a[r, c] = -math.sqrt((2 * r + 1) * (2 * c + 1)) if r > c else (-(r + 1) if r == c else 0.0)
    s = a + np.outer(p, p)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.conj().T, s, atol=1e-8 * n)
    np.testing.assert_allclose(v.conj().T @ v, np.eye(n), atol=1e-10 * n)  # V is unitary (S is normal)
    # The eigenvalues are those numpy finds for S directly (as a multiset).
    direct = np.linalg.eigvals(s)
    np.testing.assert_allclose(np.sort(direct.imag), np.sort(lam.imag), atol=1e-6 * n)
    np.testing.assert_allclose(direct.real, -0.5, atol=1e-6 * n)


def test_hippo_init_tiles_blocks():
    lam4, v4 = hippo_legs_diagonal(4)
    lam, v = hippo_init(12, blocks=3)
    assert lam.shape == (12,) and v.shape == (12, 12)
    np.testing.assert_allclose(lam, np.concatenate([lam4] * 3))
    for r in range(3):
        for c in range(3):
            block = v[4 * r:4 * r + 4, 4 * c:4 * c + 4]
            np.testing.assert_allclose(block, v4 if r == c else np.zeros((4, 4)))
    lam1, v1 = hippo_init(8)
    lam8, v8 = hippo_legs_diagonal(8)
    np.testing.assert_allclose(lam1, lam8)
    np.testing.assert_allclose(v1, v8)
    with pytest.raises(ValueError, match="divisible"):
        hippo_init(10, blocks=3)


# --- discretisation ---------------------------------------------------------------------------------

def test_discretize_closed_forms():
    lam = np.array([-0.5 + 2j, -0.5 - 7j, -0.5 + 0j, -3.0 + 0.25j])
    step = np.array([0.1, 0.01, 0.001, 0.05])
    b = np.array([[1.0 + 0j, 2.0 - 1j], [0.5j, -1.0], [3.0, 0.0], [-2.0 + 2j, 1j]])
    abar, bbar = discretize(jnp.asarray(lam, jnp.complex64), jnp.asarray(b, jnp.complex64),
                            jnp.asarray(step, jnp.float32), "bilinear")
    # Hand-picked: Lambda = -0.5 + 2j, step 0.1 -> Abar = (1 + 0.05 Lambda) / (1 - 0.05 Lambda).
    l0 = -0.5 + 2j
    np.testing.assert_allclose(complex(abar[0]), (1 + 0.05 * l0) / (1 - 0.05 * l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bbar[0]), 0.1 / (1 - 0.05 * l0) * b[0], rtol=1e-6)
    expected_a = (1 + step / 2 * lam) / (1 - step / 2 * lam)
    expected_b = (step / (1 - step / 2 * lam))[:, None] * b
    np.testing.assert_allclose(np.asarray(abar), expected_a, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bbar), expected_b, rtol=1e-6, atol=1e-9)

    abar, bbar = discretize(jnp.asarray(lam, jnp.complex64), jnp.asarray(b, jnp.complex64),
                            jnp.asarray(step, jnp.float32), "zoh")
    np.testing.assert_allclose(complex(abar[0]), np.exp(0.1 * l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bbar[0]), (np.exp(0.1 * l0) - 1) / l0 * b[0], rtol=1e-5)
    za = np.exp(step * lam)
    np.testing.assert_allclose(np.asarray(abar), za, rtol=1e-6)
    # (Abar - 1) / Lambda ~ step for small step: float32 cancellation in Abar - 1 limits the accuracy.
    np.testing.assert_allclose(np.asarray(bbar), ((za - 1) / lam)[:, None] * b, rtol=2e-4, atol=1e-9)
    # Both are stable maps: |Abar| < 1 for Re(Lambda) < 0.
    assert np.all(np.abs(expected_a) < 1) and np.all(np.abs(za) < 1)


def test_discretize_unknown_method_raises():
    with pytest.raises(ValueError, match="euler"):
        discretize(jnp.array([-0.5 + 1j]), jnp.ones((1, 2), jnp.complex64), jnp.array([0.1]), "euler")


# --- the scan ---------------------------------------------------------------------------------------

def numpy_scan(abar, bu, is_first, x_init, x_prev):
    """The recurrence, one step at a time in numpy (complex128)."""
    abar, bu, x_init = np.asarray(abar, np.complex128), np.asarray(bu, np.complex128), np.asarray(x_init, np.complex128)
    is_first = np.asarray(is_first)
    b, t, _ = bu.shape
    xs = np.zeros(bu.shape, np.complex128)
    for i in range(b):
        x = np.asarray(x_prev[i], np.complex128)
        for s in range(t):
            x = abar * (x_init[i] if is_first[i, s] else x) + bu[i, s]
            xs[i, s] = x
    return xs


def crandn(rng, *shape):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def random_abar(rng, p=P):
    """|Abar| in [0.9, 0.99] with random phases, one mode exactly at modulus 0.99."""
    mod = rng.uniform(0.9, 0.99, p)
    mod[0] = 0.99
    return (mod * np.exp(1j * rng.uniform(-np.pi, np.pi, p))).astype(np.complex64)


def reset_patterns(t):
    """[3, t] reset flags: row 0 none at all, row 1 at the first step, mid-sequence and the last step,
    row 2 consecutive resets mid-sequence and one at the second-to-last and last step."""
    f = np.zeros((3, t), bool)
    f[1, [0, t // 2, t - 1]] = True
    f[2, [3, 4, 5, t - 2, t - 1]] = True
    return f


def scan_case(t, seed):
    rng = np.random.default_rng(seed)
    return (random_abar(rng), crandn(rng, B, t, P), reset_patterns(t), 2.0 * crandn(rng, B, P),
            3.0 * crandn(rng, B, P))


def assert_states_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_scan_parallel_and_sequential_match_numpy_loop(t, seed):
    abar, bu, is_first, x_init, x_prev = scan_case(t, seed)
    truth = numpy_scan(abar, bu, is_first, x_init, x_prev)
    # The test would catch dropped carry-in or reset terms: both matter here.
    assert np.abs(truth[0, -1]).max() > 0.1 and np.abs(truth[1, 0] - (abar * x_init[1] + bu[1, 0])).max() < 1e-5
    for fn in (SCAN_PAR, SCAN_SEQ):
        xs = fn(*map(jnp.asarray, (abar, bu, is_first, x_init, x_prev)))
        assert xs.shape == (B, t, P) and xs.dtype == jnp.complex64
        assert_states_close(xs, truth)


def test_scan_all_resets_and_first_step_closed_forms():
    t = LENGTHS[0]
    abar, bu, _, x_init, x_prev = scan_case(t, 3)
    # Every step a reset: x_t = Abar x_init + bu_t for every t.
    xs = np.asarray(SCAN_PAR(*map(jnp.asarray, (abar, bu, np.ones((B, t), bool), x_init, x_prev))))
    assert_states_close(xs, abar * x_init[:, None] + bu)
    # No resets with zero inputs: x_t = Abar^(t+1) x_prev (the carried-in state decays, nothing else).
    xs = np.asarray(SCAN_PAR(*map(jnp.asarray, (abar, np.zeros_like(bu), np.zeros((B, t), bool), x_init, x_prev))))
    powers = abar.astype(np.complex128)[None, :] ** np.arange(1, t + 1)[:, None]
    assert_states_close(xs, powers[None] * x_prev[:, None])


def loss_fn(scan, weights):
    def loss(abar, bu, x_init, x_prev, is_first):
        xs = scan(abar, bu, is_first, x_init, x_prev)
        return jnp.sum(jnp.real(xs) * weights[0] + jnp.imag(xs) * weights[1])
    return loss


@pytest.fixture(scope="module")
def grad_fns():
    rng = np.random.default_rng(9)
    out = {}
    for t in LENGTHS:
        w = jnp.asarray(rng.normal(size=(2, B, t, P)), jnp.float32)
        out[t] = tuple(jax.jit(jax.grad(loss_fn(s, w), argnums=(0, 1, 2, 3))) for s in (scan_parallel, scan_sequential))
    return out


@pytest.mark.parametrize("t", LENGTHS)
def test_scan_gradients_parallel_equal_sequential(grad_fns, t):
    abar, bu, is_first, x_init, x_prev = map(jnp.asarray, scan_case(t, 11))
    par, seq = grad_fns[t]
    g_par = par(abar, bu, x_init, x_prev, is_first)
    g_seq = seq(abar, bu, x_init, x_prev, is_first)
    for name, a, b in zip(("abar", "bu", "x_init", "x_prev"), g_par, g_seq):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(a)), name
        assert np.abs(b).max() > 1e-3, name  # a nontrivial gradient
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)
    # Independent facts: row 1 resets at step 0, so the carried-in state gets no gradient there;
    # row 0 never resets, so x_init gets none there.
    g_x_prev, g_x_init = np.asarray(g_par[3]), np.asarray(g_par[2])
    np.testing.assert_array_equal(g_x_prev[1], 0.0)
    np.testing.assert_array_equal(g_x_init[0], 0.0)
    assert np.abs(g_x_prev[0]).max() > 1e-3 and np.abs(g_x_init[1]).max() > 1e-3


def test_reset_at_step_t_cuts_off_everything_before_t():
    """Regression (bug 1, misaligned reset flags): a reset at t makes x_t = Abar x_init + bu_t exactly,
    and x_t.. x_T do not depend on x_prev or bu_0 .. bu_{t-1}."""
    t = LENGTHS[1]
    rng = np.random.default_rng(5)
    abar, bu, x_init, x_prev = random_abar(rng), crandn(rng, B, t, P), crandn(rng, B, P), crandn(rng, B, P)
    resets = [1, 9, t - 1]  # one reset per row, at different places (second step, middle, last)
    is_first = np.zeros((B, t), bool)
    is_first[np.arange(B), resets] = True
    xs = np.asarray(SCAN_PAR(*map(jnp.asarray, (abar, bu, is_first, x_init, x_prev))))
    bu2 = bu.copy()
    for i, r in enumerate(resets):
        bu2[i, :r] = 10.0 * crandn(rng, r, P)
    xs2 = np.asarray(SCAN_PAR(*map(jnp.asarray, (abar, bu2, is_first, x_init, 5.0 * x_prev))))
    for i, r in enumerate(resets):
        np.testing.assert_allclose(xs[i, r], abar * x_init[i] + bu[i, r], rtol=1e-5, atol=1e-5,
                                   err_msg=f"row {i}: reset at step {r} does not give Abar x_init + bu_t")
        np.testing.assert_array_equal(xs[i, r:], xs2[i, r:], err_msg=f"row {i}: state after the reset at {r} "
                                                                     "depends on the inputs before it")
        assert np.abs(xs[i, :r] - xs2[i, :r]).max() > 1e-2  # the perturbation did change the past


def test_reset_to_nonzero_initial_state_does_not_depend_on_its_position():
    """Regression (bug 2, non-associative reset operator): with x_init != 0, a reset followed by a fixed
    tail gives the same states wherever the reset falls in the (fixed-length) scan."""
    t, tail = LENGTHS[1], 10
    rng = np.random.default_rng(6)
    abar = random_abar(rng)
    x_init = 3.0 * crandn(rng, 1, P)  # the same initial state for every row
    bu_tail = crandn(rng, tail, P)
    # Reference: the tail alone from a reset at step 0 (numpy), padded with arbitrary steps after it.
    ref = numpy_scan(abar, bu_tail[None], np.eye(1, tail, dtype=bool), x_init, np.zeros((1, P)))[0]
    for start in range(0, t - tail + 1, B):
        starts = [min(start + i, t - tail) for i in range(B)]
        bu = 2.0 * crandn(rng, B, t, P)  # junk before and after the tail
        is_first = rng.uniform(size=(B, t)) < 0.2  # other resets before the tail, too
        for i, s in enumerate(starts):
            bu[i, s:s + tail] = bu_tail
            is_first[i, s:s + tail] = False
            is_first[i, s] = True
        xs = np.asarray(SCAN_PAR(*map(jnp.asarray, (abar, bu, is_first, np.repeat(x_init, B, 0),
                                                     crandn(rng, B, P)))))
        for i, s in enumerate(starts):
            np.testing.assert_allclose(xs[i, s:s + tail], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                       err_msg=f"reset at step {s}: result depends on where the reset falls")


# --- the SSM module ---------------------------------------------------------------------------------

WIDTH, SSM_P, SSM_T = 4, 6, LENGTHS[0]


@pytest.fixture(scope="module")
def ssm():
    return SSM(WIDTH, SSM_P, key=jax.random.PRNGKey(0), blocks=2)


SSM_CALL = jax.jit(lambda m, *a: m(*a))
SSM_STEP = jax.jit(lambda m, *a: m.step(*a))


def numpy_ssm_step(m, u, x_prev):
    """One step read off the module's parameters, in numpy complex128 (bilinear)."""
    lam = np.minimum(np.asarray(m.lambda_re, np.float64), -1e-4) + 1j * np.asarray(m.lambda_im, np.float64)
    step = np.exp(np.asarray(m.log_step, np.float64))
    b = np.asarray(m.b, np.float64)
    c = np.asarray(m.c, np.float64)
    b, c = b[..., 0] + 1j * b[..., 1], c[..., 0] + 1j * c[..., 1]
    abar = (1 + step / 2 * lam) / (1 - step / 2 * lam)
    bbar = (step / (1 - step / 2 * lam))[:, None] * b
    x = abar * x_prev + np.asarray(u, np.float64) @ bbar.T
    y = np.real(x @ c.T) + np.asarray(m.d, np.float64) * u
    return y, x


def test_ssm_leaves_are_real_and_step_sizes_in_range(ssm):
    leaves = jax.tree.leaves(ssm)
    assert leaves and all(not jnp.iscomplexobj(x) for x in leaves), [x.dtype for x in leaves]
    assert ssm.b.shape == (SSM_P, WIDTH, 2) and ssm.c.shape == (WIDTH, SSM_P, 2) and ssm.d.shape == (WIDTH,)
    assert ssm.state_size == SSM_P
    log_step = np.asarray(ssm.log_step)
    assert log_step.shape == (SSM_P,)
    assert np.all(log_step >= np.log(1e-3) - 1e-6) and np.all(log_step <= np.log(1e-1) + 1e-6)
    # Two HiPPO blocks of size 3: every real part -0.5, imaginary parts tiled.
    np.testing.assert_allclose(np.asarray(ssm.lambda_re), -0.5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ssm.lambda_im), np.tile(hippo_legs_diagonal(3)[0].imag, 2), atol=1e-6)
    abar, _ = ssm.discrete()
    assert np.all(np.abs(np.asarray(abar)) < 1)


def test_ssm_step_matches_numpy(ssm):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(B, WIDTH)).astype(np.float32)
    x_prev = crandn(rng, B, SSM_P)
    y, x = SSM_STEP(ssm, jnp.asarray(u), jnp.asarray(x_prev))
    y_np, x_np = numpy_ssm_step(ssm, u, x_prev)
    np.testing.assert_allclose(np.asarray(x), x_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-5, atol=1e-5)


def test_ssm_parallel_call_equals_repeated_step_with_resets(ssm):
    rng = np.random.default_rng(1)
    u = rng.normal(size=(B, SSM_T, WIDTH)).astype(np.float32)
    is_first = reset_patterns(SSM_T)
    x_init, x_prev = crandn(rng, B, SSM_P), crandn(rng, B, SSM_P)
    ys, xs = SSM_CALL(ssm, jnp.asarray(u), jnp.asarray(is_first), jnp.asarray(x_init), jnp.asarray(x_prev))
    assert ys.shape == (B, SSM_T, WIDTH) and xs.shape == (B, SSM_T, SSM_P)
    x = jnp.asarray(x_prev)
    y_loop, x_loop, y_np, x_np = [], [], [], []
    xn = x_prev.astype(np.complex128)
    for t in range(SSM_T):
        x = jnp.where(jnp.asarray(is_first[:, t])[:, None], jnp.asarray(x_init), x)
        y, x = SSM_STEP(ssm, jnp.asarray(u[:, t]), x)
        y_loop.append(y)
        x_loop.append(x)
        xn = np.where(is_first[:, t, None], x_init, xn)
        yn, xn = numpy_ssm_step(ssm, u[:, t], xn)
        y_np.append(yn)
        x_np.append(xn)
    np.testing.assert_allclose(np.asarray(xs), np.stack(x_loop, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys), np.stack(y_loop, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(xs), np.stack(x_np, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys), np.stack(y_np, 1), rtol=1e-5, atol=1e-5)
