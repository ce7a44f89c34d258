"""FFM and the windowed Transformer behind the sequence-model interface, with tiny configurations.

Truth: a python loop of `obs_step` for `observe` (resets at the first, a middle and the last step,
a carried-in state); a numpy loop of FFM's recurrence in complex128 for its associative scan, and
both groupings of its combine; numpy attention over the last W steps of the episode for the
Transformer's ring buffer; a fresh start for everything after `is_first`.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import loop_obs_step, sine_batch
from worldmodels import agent as agent_lib
from worldmodels.config import make_config
from worldmodels.sequence import FFM, FFMConfig, FFMState, Transformer, TransformerConfig, TransformerState
from worldmodels.sequence.ffm import aggregate_parallel, combine

EMBED, ACT = 5, 2
B, T = 3, 12
T0 = 5  # the mid-sequence reset of the boundary test
FFM_CFG = FFMConfig(deter=16, width=8, memory=5, contexts=3, hidden=8, stoch=4, classes=3, max_period=20)
TF_CFG = TransformerConfig(width=8, layers=2, heads=2, ffn=16, window=4, hidden=8, stoch=4, classes=3)
MODELS = {"ffm": lambda **kw: FFM(dataclasses.replace(FFM_CFG, **kw), EMBED, ACT, key=jax.random.PRNGKey(0)),
          "transformer": lambda **kw: Transformer(dataclasses.replace(TF_CFG, **kw), EMBED, ACT,
                                                  key=jax.random.PRNGKey(0))}

OBSERVE = jax.jit(lambda m, *args: m.observe(*args))
IMG_STEP = jax.jit(lambda m, *args: m.img_step(*args))


def sequence(seed, is_first, t=T):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    embed = jax.random.normal(k1, (B, t, EMBED))
    action = 2.0 * jax.random.normal(k2, (B, t, ACT))  # some |a| > 1 to exercise the action scaling
    return embed, action, jnp.asarray(is_first)


def mixed_resets(t=T):
    """Row 0: no reset (runs on from the carried-in state); row 1: first and a middle step; row 2:
    consecutive resets and one at the last step."""
    f = np.zeros((B, t), bool)
    f[1, [0, t // 2]] = True
    f[2, [2, 3, t - 1]] = True
    return f


def at(state, t):
    return jax.tree.map(lambda x: x[:, t], state)


def assert_states_close(a, b, atol=1e-5, msg=""):
    for name, x, y in zip(a._fields, a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5, err_msg=f"{msg} {name}")


@pytest.fixture(scope="module", params=list(MODELS))
def observed(request):
    """Two consecutive sequences observed in parallel and by the obs_step loop, the second from the
    first's last state (not the initial one)."""
    model = MODELS[request.param]()
    key1, key2 = jax.random.split(jax.random.PRNGKey(3))
    first = np.zeros((B, T), bool)
    first[:, 0] = True
    seq1, seq2 = sequence(1, first), sequence(2, mixed_resets())
    post1, prior1 = OBSERVE(model, model.initial(B), *seq1, key1)
    lpost1, lprior1 = loop_obs_step(model, model.initial(B), *seq1, jax.random.split(key1, T))
    carried = at(post1, -1)
    post2, prior2 = OBSERVE(model, carried, *seq2, key2)
    lpost2, lprior2 = loop_obs_step(model, carried, *seq2, jax.random.split(key2, T))
    return dict(name=request.param, model=model, parallel=(post1, prior1, post2, prior2),
                loop=(lpost1, lprior1, lpost2, lprior2), carried=carried, seq2=seq2, key2=key2)


def test_observe_equals_obs_step_loop(observed):
    names = ("post, first sequence", "prior, first sequence", "post, carried-in", "prior, carried-in")
    for name, par, loop in zip(names, observed["parallel"], observed["loop"]):
        assert par.deter.shape[:2] == (B, T)
        assert_states_close(par, loop, msg=f"{observed['name']}, {name}:")
    model = observed["model"]
    # The carried-in state matters for row 0 (no reset in sequence 2) but not for row 1 (reset at 0).
    fresh, _ = OBSERVE(model, model.initial(B), *observed["seq2"], observed["key2"])
    post2 = observed["parallel"][2]
    assert np.abs(np.asarray(fresh.deter[0] - post2.deter[0])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(fresh.deter[1]), np.asarray(post2.deter[1]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(post2.stoch).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_nothing_of_a_previous_episode_leaks_past_is_first(name):
    model = MODELS[name]()
    is_first = np.zeros((B, T), bool)
    is_first[:, 0] = True
    is_first[[0, 2], T0] = True  # rows 0 and 2 start a new episode at T0; row 1 runs on
    embed, action, is_first = sequence(4, is_first)
    key = jax.random.PRNGKey(5)
    post, prior = OBSERVE(model, model.initial(B), embed, action, is_first, key)
    embed2 = embed.at[:, :T0].set(5.0 * jax.random.normal(jax.random.PRNGKey(6), (B, T0, EMBED)))
    action2 = action.at[:, :T0 + 1].set(-action[:, :T0 + 1] + 1.0)
    post2, prior2 = OBSERVE(model, model.initial(B), embed2, action2, is_first, key)
    assert np.abs(np.asarray(post2.stoch[:, T0 - 1] - post.stoch[:, T0 - 1])).max() > 0.5  # it did change
    for a, b in ((post, post2), (prior, prior2)):
        for field, x, y in zip(a._fields, a, b):
            np.testing.assert_allclose(np.asarray(x[[0, 2], T0:]), np.asarray(y[[0, 2], T0:]), atol=1e-6,
                                       err_msg=f"{name}: {field} after is_first moved with the previous episode")
    assert np.abs(np.asarray(post2.deter[1, T0:] - post.deter[1, T0:])).max() > 1e-3  # row 1 did not reset


@pytest.mark.parametrize("name", list(MODELS))
def test_imagination_from_a_parallel_state_equals_the_recurrent_rollout(name):
    model = MODELS[name]()
    is_first = mixed_resets()
    embed, action, is_first = sequence(7, is_first)
    key = jax.random.PRNGKey(8)
    post, _ = OBSERVE(model, model.initial(B), embed, action, is_first, key)
    t = T - 2
    lpost, _ = loop_obs_step(model, model.initial(B), embed[:, :t + 1], action[:, :t + 1], is_first[:, :t + 1],
                             jax.random.split(key, T)[:t + 1])
    a, b = at(post, t), at(lpost, t)
    assert_states_close(a, b, msg="start state:")
    actions = jax.random.normal(jax.random.PRNGKey(9), (6, B, ACT))
    keys = jax.random.split(jax.random.PRNGKey(10), 6)
    start = a
    for k in range(6):  # longer than the Transformer's window: its ring wraps around
        a, b = IMG_STEP(model, a, actions[k], keys[k]), IMG_STEP(model, b, actions[k], keys[k])
        assert_states_close(a, b, msg=f"{name}, imagined step {k + 1}:")
    assert np.abs(np.asarray(a.deter - start.deter)).max() > 1e-2


# --- FFM ------------------------------------------------------------------------------------------

def ffm_reference(log_gamma, u, is_first, memory):
    """The recurrence S_t = gamma * (0 if is_first_t else S_{t-1}) + u_t, a numpy loop in complex128."""
    gamma = np.exp(np.asarray(log_gamma, np.complex128))
    s = np.asarray(memory, np.complex128)
    out = []
    for t in range(u.shape[1]):
        s = np.where(is_first[:, t, None, None], 0.0, s)
        s = gamma * s + np.asarray(u[:, t], np.float64)[..., None]
        out.append(s)
    return np.stack(out, 1)


@pytest.mark.parametrize("t", [12, 1500])  # 1500: longer than the slowest trace's period (max_period 1024)
def test_ffm_scan_equals_the_recurrence(t):
    model = FFM(dataclasses.replace(FFM_CFG, max_period=1024), EMBED, ACT, key=jax.random.PRNGKey(0))
    log_gamma = model.log_gamma()
    rng = np.random.default_rng(0)
    u = rng.normal(size=(B, t, FFM_CFG.memory)).astype(np.float32)
    is_first = mixed_resets(t)
    is_first[0, t - 3] = True
    memory = (rng.normal(size=(B, FFM_CFG.memory, FFM_CFG.contexts))
              + 1j * rng.normal(size=(B, FFM_CFG.memory, FFM_CFG.contexts))).astype(np.complex64)
    got = jax.jit(aggregate_parallel)(log_gamma, u, is_first, memory)
    want = ffm_reference(log_gamma, u, is_first, memory)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * scale, rtol=1e-4)
    assert np.abs(want[0, 0] - ffm_reference(log_gamma, u[:, :1], is_first[:, :1], 0 * memory)[0, 0]).max() > 1e-2


def test_ffm_combine_is_associative_with_resets_anywhere():
    model = MODELS["ffm"]()
    log_gamma = model.log_gamma()
    rng = np.random.default_rng(1)
    shape = (64, FFM_CFG.memory, FFM_CFG.contexts)
    element = lambda: (jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), jnp.complex64),
                       jnp.asarray(rng.integers(1, 5, (64, 1, 1)), jnp.float32),
                       jnp.asarray(rng.random((64, 1, 1)) < 0.4, jnp.float32))
    a, b, c = element(), element(), element()
    left = combine(log_gamma, combine(log_gamma, a, b), c)
    right = combine(log_gamma, a, combine(log_gamma, b, c))
    for x, y in zip(left, right):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
    resets = np.asarray(a[2] + b[2] + c[2]).ravel()
    assert ((resets > 0) & (resets < 3)).any()  # some triples mix resets and none
    # Keeping only the later flag (the public JAX port's combine) breaks associativity there.
    only_later = lambda e, l: (combine(log_gamma, e, l)[0], e[1] + l[1], l[2])
    l2, r2 = only_later(only_later(a, b), c), only_later(a, only_later(b, c))
    assert np.abs(np.asarray(l2[0] - r2[0])).max() > 1e-3


@pytest.mark.parametrize("mode, dim", [("output", 16 + 12), ("hidden", 12 + 2 * 5 * 3), ("full", 16 + 12 + 30)])
def test_ffm_policy_features(mode, dim):
    model = MODELS["ffm"](policy_input=mode)
    embed, action, is_first = sequence(11, mixed_resets())
    state, _ = OBSERVE(model, model.initial(B), embed, action, is_first, jax.random.PRNGKey(0))
    assert model.policy_feature_dim == dim and model.feature_dim == 16 + 12
    feat = np.asarray(model.policy_features(state))
    z = np.asarray(state.stoch).reshape(B, T, -1)
    s = np.asarray(state.memory).reshape(B, T, -1)
    assert np.abs(s).max() > 1e-2
    pieces = {"output": [state.deter, z], "hidden": [z, s], "full": [state.deter, z, s]}[mode]
    np.testing.assert_array_equal(feat, np.concatenate([np.asarray(p) for p in pieces], -1))


# --- Transformer ----------------------------------------------------------------------------------

def rotate_np(x, position):
    e = x.shape[-1]
    freq = 1.0 / 10000.0 ** (np.arange(0, e, 2) / e)
    angle = position[:, None, None] * freq
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * np.cos(angle) - x2 * np.sin(angle)
    out[..., 1::2] = x1 * np.sin(angle) + x2 * np.cos(angle)
    return out


def layer_norm_np(x, norm):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + norm.eps)
    return x * np.asarray(norm.scale) + np.asarray(norm.offset)


def test_transformer_ring_attention_equals_attention_over_the_last_window_of_the_episode():
    """One layer, so that the output at t depends on the tokens of steps t - W + 1 ... t only: numpy
    attention over exactly those steps of t's episode equals what the obs_step loop gives."""
    model = MODELS["transformer"](layers=1)
    w, heads = TF_CFG.window, TF_CFG.heads
    embed, action, is_first = sequence(12, mixed_resets())
    keys = jax.random.split(jax.random.PRNGKey(13), T)
    post, _ = loop_obs_step(model, model.initial(B), embed, action, is_first, keys)
    stoch = np.asarray(post.stoch)
    block = model.blocks[0]
    lin = lambda layer, x: x @ np.asarray(layer.weight) + np.asarray(layer.bias)
    gelu = lambda x: np.asarray(jax.nn.gelu(jnp.asarray(x)))
    first = np.asarray(is_first)
    for b in range(B):
        start = None
        for t in range(T):
            # An episode carried in from the initial state (row 0) starts at step 0 at position 0.
            start = t if first[b, t] or start is None else start
            steps = np.arange(max(start, t - w + 1), t + 1)
            prev = np.array([np.zeros_like(stoch[b, 0]) if first[b, s] or s == 0 else stoch[b, s - 1] for s in steps])
            act = np.array([np.zeros(ACT) if first[b, s] else np.asarray(action[b, s]) for s in steps])
            tokens = np.asarray(model._token(jnp.asarray(prev, jnp.float32), jnp.asarray(act, jnp.float32)))
            h = layer_norm_np(tokens, block.attn_norm)
            q, k, v = np.split(lin(block.qkv, h), 3, -1)
            split = lambda y: y.reshape(len(steps), heads, -1)
            position = (steps - start).astype(np.float64)
            q, k, v = rotate_np(split(q), position), rotate_np(split(k), position), split(v)
            scores = np.einsum("he,mhe->hm", q[-1], k) / np.sqrt(q.shape[-1])
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            x = tokens[-1] + lin(block.out, np.einsum("hm,mhe->he", weights, v).reshape(-1))
            x = x + lin(block.ffn_out, gelu(lin(block.ffn_in, layer_norm_np(x, block.ffn_norm))))
            np.testing.assert_allclose(np.asarray(post.deter[b, t]), layer_norm_np(x, model.out_norm), atol=1e-4,
                                       err_msg=f"row {b}, step {t}")


def test_transformer_state_is_a_fixed_size_ring():
    model = MODELS["transformer"]()
    embed, action, is_first = sequence(14, mixed_resets())
    post, _ = OBSERVE(model, model.initial(B), embed, action, is_first, jax.random.PRNGKey(0))
    w = TF_CFG.window
    assert post.keys.shape == (B, T, TF_CFG.layers, w, TF_CFG.width) and post.slot_step.shape == (B, T, w)
    step = np.asarray(post.step)
    np.testing.assert_array_equal(step[1], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])  # resets at 0 and 6
    slots = np.asarray(post.slot_step)
    for b in range(B):
        for t in range(T):  # slot p mod W holds step p for the last min(W, p + 1) steps, the rest empty
            held = {p % w: p for p in range(max(0, step[b, t] - w + 1), step[b, t] + 1)}
            np.testing.assert_array_equal(slots[b, t], [held.get(s, -1) for s in range(w)])
    empty = np.broadcast_to((slots == -1)[:, :, None], post.keys.shape[:-1])
    assert empty.any() and (np.asarray(post.keys)[empty] == 0).all()


# --- the agent with each model ---------------------------------------------------------------------

OVERRIDES = {
    "ffm": {"agent.world_model.sequence.model": "ffm", **{f"agent.world_model.sequence.ffm.{k}": v for k, v in
            dict(deter=16, width=8, memory=4, contexts=2, hidden=8, stoch=4, classes=3).items()}},
    "transformer": {"agent.world_model.sequence.model": "transformer", "run.replay_context": False,
                    **{f"agent.world_model.sequence.transformer.{k}": v for k, v in
                       dict(width=8, layers=2, heads=2, ffn=16, window=8, hidden=8, stoch=4, classes=3).items()}},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_agent_trains_and_acts_compiling_once(name):
    config = make_config(["debug"], OVERRIDES[name]).agent
    state = agent_lib.init(config, {"vector": ((3,), "float32")}, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(0))
    assert isinstance(state.world_model.dynamics, {"ffm": FFM, "transformer": Transformer}[name])
    before = dict(agent_lib.TRACE_COUNTS)
    for i in range(3):
        state, metrics, _ = agent_lib.train(state, sine_batch(seed=i), jax.random.PRNGKey(i))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert metrics["train/skipped"] == 0.0 and metrics["grad_norm"] > 0
    assert int(state.step) == 3
    # The non-finite guard: a batch with a NaN leaves the whole state as it was (the same program).
    bad = sine_batch(seed=9)
    bad["vector"][1, 3, 0] = np.nan
    kept = agent_lib.copy_state(state)
    state, metrics, _ = agent_lib.train(state, bad, jax.random.PRNGKey(9))
    assert float(metrics["train/skipped"]) == 1.0
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert agent_lib.TRACE_COUNTS["train"] - before.get("train", 0) <= 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)))
    carry = agent_lib.initial_carry(state, 2)
    for i in range(3):
        obs = {"vector": np.full((2, 3), i, np.float32), "is_first": np.array([i == 0, True])}
        action, carry = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(i))
        np.testing.assert_array_equal(np.asarray(action).sum(-1), 1.0)
    assert agent_lib.TRACE_COUNTS["policy"] - before.get("policy", 0) <= 1
    assert isinstance(carry.latent, {"ffm": FFMState, "transformer": TransformerState}[name])
