"""Tests for worldmodels.sequence.s3m.S3M (R2I's sequence model) with a tiny configuration.

Truth: the recurrent path (a python loop of `obs_step` with the keys `observe` uses) for the
parallel path; a fresh start for the state after a reset; hand-computed feature sizes; a numpy KL.
The learned initial SSM state is set nonzero throughout, since a zero one hides reset mistakes.
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
from worldmodels.sequence.rssm import categorical_kl_loss
from worldmodels.sequence.s3m import S3M, S3MConfig, S3MState

CFG = S3MConfig(deter=16, width=8, state_size=6, layers=2, hidden=8, stoch=4, classes=3)
EMBED, ACT = 5, 2
B, T = 3, 8
T0 = 3  # the mid-sequence reset of the boundary test
FIELDS = ("deter", "stoch", "logits", "hidden")


def make_model(learned_initial=True, **kw):
    cfg = dataclasses.replace(CFG, learned_initial=learned_initial, **kw)
    model = S3M(cfg, EMBED, ACT, key=jax.random.PRNGKey(0))
    init = 0.3 + 0.2 * jax.random.normal(jax.random.PRNGKey(42), model.init_hidden.shape)
    return eqx.tree_at(lambda m: m.init_hidden, model, init)


@pytest.fixture(scope="module")
def models():
    return {True: make_model(True), False: make_model(False)}


OBSERVE = jax.jit(lambda m, *args: m.observe(*args))
IMG_STEP = jax.jit(lambda m, *args: m.img_step(*args))
INITIAL = jax.jit(lambda m: m.initial(B))


def sequence(seed, is_first):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    embed = jax.random.normal(k1, (B, T, EMBED))
    action = 2.0 * jax.random.normal(k2, (B, T, ACT))  # some |a| > 1 to exercise the action scaling
    return embed, action, jnp.asarray(is_first)


def starts_only():
    f = np.zeros((B, T), bool)
    f[:, 0] = True
    return f


def mixed_resets():
    """Row 0: no reset at all (runs on from the carried-in state); row 1: first step and mid-sequence;
    row 2: consecutive resets and one at the last step."""
    f = np.zeros((B, T), bool)
    f[1, [0, T // 2]] = True
    f[2, [2, 3, T - 1]] = True
    return f


def at(state, t):
    return jax.tree.map(lambda x: x[:, t], state)


def assert_states_close(a, b, rows=slice(None), steps=slice(None), atol=1e-5, msg=""):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if steps is not None:
            x, y = x[rows, steps], y[rows, steps]
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5, err_msg=f"{msg} {name}")


@pytest.fixture(scope="module")
def observed(models):
    """For both initial-state modes: two consecutive sequences observed in parallel and by the loop."""
    out = {}
    for learned, model in models.items():
        key1, key2 = jax.random.split(jax.random.PRNGKey(3))
        seq1, seq2 = sequence(1, starts_only()), sequence(2, mixed_resets())
        post1, prior1 = OBSERVE(model, INITIAL(model), *seq1, key1)
        lpost1, lprior1 = loop_obs_step(model, INITIAL(model), *seq1, jax.random.split(key1, T))
        carried = at(post1, -1)  # a non-initial state to start the next sequence from
        post2, prior2 = OBSERVE(model, carried, *seq2, key2)
        lpost2, lprior2 = loop_obs_step(model, carried, *seq2, jax.random.split(key2, T))
        out[learned] = dict(parallel=(post1, prior1, post2, prior2), loop=(lpost1, lprior1, lpost2, lprior2),
                            carried=carried, seq2=seq2, key2=key2)
    return out


@pytest.mark.parametrize("learned", [True, False])
def test_observe_equals_obs_step_loop(models, observed, learned):
    obs = observed[learned]
    names = ("post, first sequence", "prior, first sequence", "post, carried-in", "prior, carried-in")
    for name, par, loop in zip(names, obs["parallel"], obs["loop"]):
        assert isinstance(par, S3MState)
        assert par.deter.shape == (B, T, CFG.deter) and par.stoch.shape == (B, T, CFG.stoch, CFG.classes)
        assert par.hidden.shape == (B, T, CFG.layers, CFG.state_size, 2)
        assert_states_close(par, loop, msg=f"learned_initial={learned}, {name}:")
    # The carried-in state is not the initial one, and it matters for row 0 (no reset in sequence 2).
    initial = INITIAL(models[learned])
    assert np.abs(np.asarray(obs["carried"].hidden - initial.hidden)).max() > 1e-2
    fresh, _ = OBSERVE(models[learned], initial, *obs["seq2"], obs["key2"])
    post2 = obs["parallel"][2]
    assert np.abs(np.asarray(fresh.deter[0] - post2.deter[0])).max() > 1e-3
    # ...but not for row 1, which resets at its first step.
    np.testing.assert_allclose(np.asarray(fresh.deter[1]), np.asarray(post2.deter[1]), atol=1e-5)
    # Samples are one-hot.
    np.testing.assert_allclose(np.asarray(post2.stoch).sum(-1), 1.0, atol=1e-5)
    assert set(np.unique(np.round(np.asarray(post2.stoch), 4))) <= {0.0, 1.0}


def test_initial_state(models):
    learned, zero = INITIAL(models[True]), INITIAL(models[False])
    np.testing.assert_allclose(np.asarray(learned.hidden),
                               np.broadcast_to(np.asarray(models[True].init_hidden), learned.hidden.shape))
    np.testing.assert_array_equal(np.asarray(zero.hidden), 0.0)
    for state in (learned, zero):
        for name in ("deter", "logits"):
            np.testing.assert_array_equal(np.asarray(getattr(state, name)), 0.0)
    np.testing.assert_array_equal(np.asarray(zero.stoch), 0.0)
    # Learned (R2I): the prior's mode at the output state tanh(0) = 0, one-hot per latent.
    model = models[True]
    logits = np.asarray(model.prior_out(model.prior_net(jnp.zeros(CFG.deter)))).reshape(CFG.stoch, CFG.classes)
    expected = np.eye(CFG.classes)[logits.argmax(-1)]
    np.testing.assert_array_equal(np.asarray(learned.stoch), np.broadcast_to(expected, learned.stoch.shape))


@pytest.mark.parametrize("learned", [True, False])
def test_reset_mid_sequence_equals_fresh_start(models, learned):
    model = models[learned]
    is_first = starts_only()
    is_first[[0, 2], T0] = True  # rows 0 and 2 start a new episode at T0; row 1 runs on
    embed, action, is_first = sequence(4, is_first)
    key = jax.random.PRNGKey(5)
    keys = jax.random.split(key, T)
    post, prior = OBSERVE(model, INITIAL(model), embed, action, is_first, key)
    fpost, fprior = loop_obs_step(model, INITIAL(model), embed[:, T0:], action[:, T0:], is_first[:, T0:], keys[T0:])
    for name, a, b in (("post", post, fpost), ("prior", prior, fprior)):
        a = jax.tree.map(lambda x: x[:, T0:], a)
        assert_states_close(a, b, rows=[0, 2], msg=f"{name} after the reset at {T0} differs from a fresh start:")
    # Row 1 did not reset: its history matters.
    assert np.abs(np.asarray(post.deter[1, T0:] - fpost.deter[1])).max() > 1e-3
    # Regression (z_{t-1} not masked at is_first in parallel mode): changing the previous episode's
    # observations and actions leaves everything from the reset on unchanged.
    embed2 = embed.at[:, :T0].set(5.0 * jax.random.normal(jax.random.PRNGKey(6), (B, T0, EMBED)))
    action2 = action.at[:, :T0 + 1].set(-action[:, :T0 + 1] + 1.0)
    post2, _ = OBSERVE(model, INITIAL(model), embed2, action2, is_first, key)
    changed = np.abs(np.asarray(post2.stoch[:, T0 - 1] - post.stoch[:, T0 - 1])).max()
    assert changed > 0.5, "the perturbation should change the samples before the reset"
    for name in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(post2, name)[[0, 2], T0:]),
                                   np.asarray(getattr(post, name)[[0, 2], T0:]), atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def imagination_starts(models):
    model = models[True]
    is_first = starts_only()
    is_first[0, 2] = True
    embed, action, is_first = sequence(7, is_first)
    key = jax.random.PRNGKey(8)
    t = 5
    post, _ = OBSERVE(model, INITIAL(model), embed, action, is_first, key)
    lpost, _ = loop_obs_step(model, INITIAL(model), embed[:, :t + 1], action[:, :t + 1], is_first[:, :t + 1],
                             jax.random.split(key, T)[:t + 1])
    return model, at(post, t), at(lpost, t)


def test_imagination_from_parallel_state_equals_recurrent_rollout(imagination_starts):
    model, par, rec = imagination_starts
    assert_states_close(par, rec, steps=None, msg="start state:")
    actions = jax.random.normal(jax.random.PRNGKey(9), (5, B, ACT))
    keys = jax.random.split(jax.random.PRNGKey(10), 5)
    a, b = par, rec
    for k in range(5):
        a, b = IMG_STEP(model, a, actions[k], keys[k]), IMG_STEP(model, b, actions[k], keys[k])
        assert_states_close(a, b, steps=None, msg=f"imagined step {k + 1}:")
    # Imagination moves the state (it is not stuck at the start).
    assert np.abs(np.asarray(a.hidden - par.hidden)).max() > 1e-2


@pytest.mark.parametrize("mode, dim", [("output", 16 + 12), ("hidden", 12 + 2 * 6 * 2), ("full", 16 + 12 + 24)])
def test_policy_features(observed, mode, dim):
    model = make_model(policy_input=mode)
    state = observed[True]["parallel"][2]  # posterior [B, T]
    assert model.policy_feature_dim == dim
    assert model.feature_dim == 16 + 12
    feat = np.asarray(model.policy_features(state))
    assert feat.shape == (B, T, dim)
    deter, z, hidden = (np.asarray(x) for x in (state.deter, state.stoch, state.hidden))
    z = z.reshape(B, T, CFG.stoch * CFG.classes)
    np.testing.assert_array_equal(np.asarray(model.features(state)), np.concatenate([deter, z], -1))
    pieces = {"output": [deter, z], "hidden": [z, None], "full": [deter, z, None]}[mode]
    offset = 0
    for piece in pieces:
        if piece is None:  # the SSM states: every layer, every mode, (real, imag)
            for layer in range(CFG.layers):
                for p in range(CFG.state_size):
                    for part in range(2):
                        np.testing.assert_array_equal(feat[..., offset], hidden[:, :, layer, p, part])
                        offset += 1
        else:
            np.testing.assert_array_equal(feat[..., offset:offset + piece.shape[-1]], piece)
            offset += piece.shape[-1]
    assert offset == dim
    assert np.abs(hidden).max() > 1e-2  # nonzero, so the checks above mean something


def test_kl_loss_matches_numpy(models, observed):
    model = models[True]
    post, prior = observed[True]["parallel"][2:]

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(post.logits), log_softmax(prior.logits)
    kl = np.sum(np.exp(lp) * (lp - lq), (-2, -1))
    assert kl.shape == (B, T)
    free = float(np.median(kl))  # some steps clipped, some not
    dyn, rep = model.kl_loss(post, prior, free)
    ref_dyn, ref_rep = categorical_kl_loss(post.logits, prior.logits, free)
    for got, ref in ((dyn, ref_dyn), (rep, ref_rep)):
        assert got.shape == (B, T)
        np.testing.assert_allclose(np.asarray(got), np.maximum(kl, free), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


# --- the agent with S3M -------------------------------------------------------------------------

S3M_OVERRIDES = {"agent.world_model.sequence.model": "s3m", "agent.world_model.sequence.s3m.deter": 16,
                 "agent.world_model.sequence.s3m.width": 8, "agent.world_model.sequence.s3m.state_size": 6,
                 "agent.world_model.sequence.s3m.layers": 2, "agent.world_model.sequence.s3m.hidden": 8,
                 "agent.world_model.sequence.s3m.stoch": 4, "agent.world_model.sequence.s3m.classes": 3}


def test_agent_with_s3m_trains_and_acts():
    config = make_config(["debug"], S3M_OVERRIDES).agent
    state = agent_lib.init(config, {"vector": ((3,), "float32")}, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(0))
    dynamics = state.world_model.dynamics
    assert isinstance(dynamics, S3M) and dynamics.config.state_size == 6
    before = agent_lib.TRACE_COUNTS["train"]
    for i in range(3):
        state, metrics, _ = agent_lib.train(state, sine_batch(seed=i), jax.random.PRNGKey(i))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert int(state.step) == 3
    assert agent_lib.TRACE_COUNTS["train"] - before <= 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)))
    carry = agent_lib.initial_carry(state, 2)
    for i in range(2):
        obs = {"vector": np.full((2, 3), i, np.float32), "is_first": np.array([i == 0, True])}
        action, carry = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(i))
        np.testing.assert_array_equal(np.asarray(action).sum(-1), 1.0)
    assert carry.latent.hidden.shape == (2, 2, 6, 2)


def test_s3m_replay_context_keeps_the_whole_state_and_continues_from_it():
    """S3M uses the interface's default entry (every state field, as is): the round trip is exact,
    and a context batch's first trained step continues from the stored state."""
    config = make_config(["debug"], S3M_OVERRIDES).agent
    state = agent_lib.init(config, {"vector": ((3,), "float32")}, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(1))
    wm, b, t = state.world_model, 4, 9
    batch = sine_batch(b, t)
    carry = agent_lib.initial_carry(state, b)
    for i in range(3):  # a latent from acting, as the loop stores it
        obs = {"vector": batch["vector"][:, i], "is_first": batch["is_first"][:, i]}
        _, carry = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(i))
    entry = jax.device_get(agent_lib.replay_latent(state, carry))
    assert set(entry) == {agent_lib.LATENT + f for f in S3MState._fields}
    context = {k[len(agent_lib.LATENT):]: v for k, v in entry.items()}
    start = wm.dynamics.from_entry(context)
    for a, f in zip(start, S3MState._fields):
        np.testing.assert_array_equal(np.asarray(a), context[f])

    rest = {k: v[:, 1:2] for k, v in batch.items()}
    observe = lambda s: wm.dynamics.observe(s, wm.encoder(rest), rest["action"], rest["is_first"],
                                            jax.random.PRNGKey(0))[0].deter[:, 0]
    expected, fresh = observe(start), observe(wm.dynamics.initial(b))
    assert np.abs(np.asarray(expected) - np.asarray(fresh)).max() > 1e-3  # the context matters
    with_context = {**batch, **{k: np.repeat(v[:, None], t, 1) for k, v in entry.items()}}
    _, _, latents = agent_lib.train(state, with_context, jax.random.PRNGKey(5))
    np.testing.assert_allclose(np.asarray(latents[agent_lib.LATENT + "deter"][:, 0]), np.asarray(expected),
                               atol=1e-5)
