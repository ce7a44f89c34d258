"""S5-style diagonal state-space layers: HiPPO init, discretisation, parallel scan with exact resets.

Shapes: P = state size (complex), H = model width. A layer maps inputs `u [B, T, H]` to outputs
`y [B, T, H]` through the diagonal linear recurrence

    x_t = Abar * x_{t-1} + Bbar @ u_t         (x complex [P], Abar complex [P], Bbar complex [P, H])
    y_t = Re(C @ x_t) + D * u_t                (C complex [H, P], D real [H])

and resets the state to `x_init` before every step with `is_first`. Complex parameters are stored
as real/imaginary pairs (a trailing axis of 2) so every leaf is a real array.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Complex, Float, PRNGKeyArray

Discretization = Literal["bilinear", "zoh"]


# --- initialisation ----------------------------------------------------------------------------
def hippo_legs(n: int) -> np.ndarray:
    """The HiPPO-LegS matrix A [n, n]: -sqrt(2i+1) sqrt(2k+1) below the diagonal, -(i+1) on it."""
    p = np.sqrt(1 + 2 * np.arange(n))
    a = p[:, None] * p[None, :]
    return -(np.tril(a) - np.diag(np.arange(n)))


def hippo_legs_diagonal(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of HiPPO-LegS's normal part S = A + P P^T (P_i = sqrt(i + 1/2)).

    S = -1/2 I + (skew-symmetric), so every eigenvalue has real part -0.5; the imaginary parts are the
    eigenvalues of the skew part. **Returns:** (Lambda complex [n], V complex [n, n]) with S = V diag(Lambda) V^H.
    """
    a = hippo_legs(n)
    p = np.sqrt(np.arange(n) + 0.5)
    s = a + p[:, None] * p[None, :]
    real = np.mean(np.diagonal(s)) * np.ones(n)
    imag, v = np.linalg.eigh(s * -1j)
    return real + 1j * imag, v


def hippo_init(state_size: int, blocks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(Lambda [P], V [P, P]) for `blocks` HiPPO-LegS blocks of size P / blocks on the diagonal."""
    if state_size % blocks:
        raise ValueError(f"SSM state size {state_size} must be divisible by hippo blocks {blocks}")
    lam, v = hippo_legs_diagonal(state_size // blocks)
    big_v = np.zeros((state_size, state_size), np.complex128)
    size = state_size // blocks
    for i in range(blocks):
        big_v[i * size:(i + 1) * size, i * size:(i + 1) * size] = v
    return np.tile(lam, blocks), big_v


def lecun_normal(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    return jax.random.truncated_normal(key, -2.0, 2.0, shape) * np.sqrt(1.0 / fan_in) / 0.87962566103423978


def as_complex(pair: Float[Array, "... 2"]) -> Complex[Array, "..."]:
    return jax.lax.complex(pair[..., 0], pair[..., 1])


def as_pair(z: Complex[Array, "..."]) -> Float[Array, "... 2"]:
    return jnp.stack([jnp.real(z), jnp.imag(z)], -1)


# --- discretisation ----------------------------------------------------------------------------
def discretize(lam: Complex[Array, " p"], b: Complex[Array, "p h"], step: Float[Array, " p"],
               method: Discretization) -> tuple[Complex[Array, " p"], Complex[Array, "p h"]]:
    """Continuous (Lambda, B) and step sizes -> (Abar, Bbar).

    bilinear: Abar = (1 + step/2 Lambda) / (1 - step/2 Lambda), Bbar = step / (1 - step/2 Lambda) B.
    zoh:      Abar = exp(step Lambda),                          Bbar = (Abar - 1) / Lambda B.
    """
    if method == "bilinear":
        inv = 1.0 / (1.0 - step / 2.0 * lam)
        return inv * (1.0 + step / 2.0 * lam), (inv * step)[:, None] * b
    if method == "zoh":
        abar = jnp.exp(step * lam)
        return abar, ((abar - 1.0) / lam)[:, None] * b
    raise ValueError(f"unknown discretization {method!r}; valid: 'bilinear', 'zoh'")


# --- the recurrence, in parallel and one step at a time ----------------------------------------
def _reset_compose(earlier, later):
    """Compose two affine maps with reset flags, `later` applied after `earlier`.

    Element (A, b, c) maps x -> A x + b when c = 0 and ignores x (x -> b) when c = 1. Associative,
    whatever the values of A and b (a reset to a nonzero initial state is folded into b beforehand).
    """
    a_i, b_i, c_i = earlier
    a_j, b_j, c_j = later
    keep = 1.0 - c_j
    return a_j * a_i * keep + a_j * c_j, (a_j * b_i + b_j) * keep + b_j * c_j, c_i * keep + c_j


def scan_parallel(abar: Complex[Array, " p"], bu: Complex[Array, "b t p"], is_first: Bool[Array, "b t"],
                  x_init: Complex[Array, "b p"], x_prev: Complex[Array, "b p"]) -> Complex[Array, "b t p"]:
    """All states of `x_t = Abar * (x_init if is_first_t else x_{t-1}) + bu_t`, starting after `x_prev`.

    Exact resets (see r2i notes): the reset is folded into the inputs, b_t = bu_t + is_first_t *
    Abar * x_init, and the carried-in state into the first input, then one associative scan with the
    reset-to-zero operator.
    """
    reset = is_first.astype(bu.real.dtype)[..., None]
    b = bu + reset * (abar * x_init)[:, None]
    b = b.at[:, 0].add((1.0 - reset[:, 0]) * abar * x_prev)
    a = jnp.broadcast_to(abar, b.shape)
    _, xs, _ = jax.lax.associative_scan(_reset_compose, (a, b, jnp.broadcast_to(reset, b.shape).astype(b.dtype)),
                                        axis=1)
    return xs


def scan_sequential(abar: Complex[Array, " p"], bu: Complex[Array, "b t p"], is_first: Bool[Array, "b t"],
                    x_init: Complex[Array, "b p"], x_prev: Complex[Array, "b p"]) -> Complex[Array, "b t p"]:
    """The same recurrence as `scan_parallel` by `lax.scan`, one step at a time (the reference)."""

    def step(x, inputs):
        bu_t, first_t = inputs
        x = abar * jnp.where(first_t[:, None], x_init, x) + bu_t
        return x, x

    _, xs = jax.lax.scan(step, x_prev, (jnp.swapaxes(bu, 0, 1), jnp.swapaxes(is_first, 0, 1)))
    return jnp.swapaxes(xs, 0, 1)


class SSM(eqx.Module):
    """One diagonal SSM: parameters, discretisation and both modes (parallel / one step)."""

    lambda_re: Float[Array, " p"]
    lambda_im: Float[Array, " p"]
    b: Float[Array, "p h 2"]
    c: Float[Array, "h p 2"]
    d: Float[Array, " h"]
    log_step: Float[Array, " p"]
    discretization: Discretization = eqx.field(static=True)

    def __init__(self, width: int, state_size: int, *, key: PRNGKeyArray, blocks: int = 1,
                 discretization: Discretization = "bilinear", step_min: float = 1e-3, step_max: float = 1e-1):
        lam, v = hippo_init(state_size, blocks)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # B = V^-1 B_real and C = C_complex V: the parameters of the diagonalised system.
        v = jnp.asarray(v, jnp.complex64)
        b = lecun_normal(k1, (state_size, width), width).astype(jnp.complex64)
        self.b = as_pair(v.conj().T @ b)
        c = lecun_normal(k2, (width, state_size, 2), state_size)
        self.c = as_pair(jax.lax.complex(c[..., 0], c[..., 1]) @ v)
        self.d = jax.random.normal(k3, (width,))
        self.lambda_re = jnp.asarray(lam.real, jnp.float32)
        self.lambda_im = jnp.asarray(lam.imag, jnp.float32)
        self.log_step = jax.random.uniform(k4, (state_size,), minval=np.log(step_min), maxval=np.log(step_max))
        self.discretization = discretization

    @property
    def state_size(self) -> int:
        return self.lambda_re.shape[0]

    def discrete(self) -> tuple[Complex[Array, " p"], Complex[Array, "p h"]]:
        # Keep the real part negative so the recurrence stays stable while training.
        lam = jax.lax.complex(jnp.minimum(self.lambda_re, -1e-4), self.lambda_im)
        return discretize(lam, as_complex(self.b), jnp.exp(self.log_step), self.discretization)

    @staticmethod
    def _input(u: Float[Array, "... h"], bbar: Complex[Array, "p h"]) -> Complex[Array, "... p"]:
        # Bbar u as one real matmul against [Re(Bbar); Im(Bbar)]: XLA's CPU complex matmul is far slower.
        p = bbar.shape[0]
        out = u @ jnp.concatenate([jnp.real(bbar), jnp.imag(bbar)], 0).T
        return jax.lax.complex(out[..., :p], out[..., p:])

    def _out(self, x: Complex[Array, "... p"], u: Float[Array, "... h"]) -> Float[Array, "... h"]:
        # Re(C x) = [Re x, Im x] @ [Re C, -Im C]^T, one real matmul.
        c = jnp.concatenate([self.c[..., 0], -self.c[..., 1]], 1)
        return jnp.concatenate([jnp.real(x), jnp.imag(x)], -1) @ c.T + self.d * u

    def __call__(self, u: Float[Array, "b t h"], is_first: Bool[Array, "b t"], x_init: Complex[Array, "b p"],
                 x_prev: Complex[Array, "b p"]) -> tuple[Float[Array, "b t h"], Complex[Array, "b t p"]]:
        """Parallel mode: (outputs y, states x) for every step."""
        abar, bbar = self.discrete()
        bu = self._input(u, bbar)
        xs = scan_parallel(abar, bu, is_first, x_init, x_prev)
        return self._out(xs, u), xs

    def step(self, u: Float[Array, "b h"], x_prev: Complex[Array, "b p"]) -> tuple[Float[Array, "b h"], Complex[Array, "b p"]]:
        """Recurrent mode: one step (the caller resets `x_prev` at episode starts)."""
        abar, bbar = self.discrete()
        x = abar * x_prev + self._input(u, bbar)
        return self._out(x, u), x
