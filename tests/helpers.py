"""Shared test inputs: a learnable replay-like batch and a step-by-step observe loop."""

import jax
import jax.numpy as jnp
import numpy as np

OBS_STEP = jax.jit(lambda m, *args: m.obs_step(*args))


def sine_batch(b=4, t=16, seed=0):
    """A replay-like batch `[b, t]` with a learnable signal: the observation follows a sine whose
    phase the reward tracks; row 0 has an episode boundary mid-window."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, (b, 1))
    steps = np.arange(t)[None]
    vec = np.stack([np.sin(phase + 0.3 * steps), np.cos(phase + 0.3 * steps), np.ones((b, t))], -1)
    is_first = np.zeros((b, t), bool)
    is_first[:, 0] = True
    is_first[0, t // 2] = True
    return {"vector": vec.astype(np.float32),
            "action": np.eye(2, dtype=np.float32)[rng.integers(0, 2, (b, t))] * ~is_first[..., None],
            "reward": np.sin(phase + 0.3 * steps).astype(np.float32), "is_first": is_first,
            "is_last": np.zeros((b, t), bool), "is_terminal": np.zeros((b, t), bool)}


def loop_obs_step(model, state, embed, action, is_first, keys):
    """A python loop of (jitted, one step at a time) `obs_step` calls with the given per-step keys."""
    posts, priors = [], []
    for t in range(embed.shape[1]):
        post, prior = OBS_STEP(model, state, embed[:, t], action[:, t], is_first[:, t], keys[t])
        posts.append(post)
        priors.append(prior)
        state = post
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a, 1), *xs)
    return stack(posts), stack(priors)
