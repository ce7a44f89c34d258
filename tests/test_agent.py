"""The agent's compiled functions: policy carry, no retracing, learning on a fixed batch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import sine_batch
from worldmodels import agent as agent_lib
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import make_config

OBS_SPEC = {"vector": ((3,), "float32")}


def tiny_agent(discrete=True, seed=0, obs_spec=OBS_SPEC, **overrides):
    config = make_config(["debug"], overrides).agent
    return agent_lib.init(config, obs_spec, agent_lib.ActionSpec(2, discrete), jax.random.PRNGKey(seed))


def test_train_keeps_losses_finite_and_lowers_world_model_loss():
    state = tiny_agent()
    batch = sine_batch()
    losses = []
    for i in range(60):
        state, metrics, _ = agent_lib.train(state, batch, jax.random.PRNGKey(i))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        losses.append(float(metrics["loss/world_model"]))
    assert int(state.step) == 60
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_train_and_policy_compile_once():
    state = tiny_agent(seed=1)
    batch = sine_batch()
    before = dict(agent_lib.TRACE_COUNTS)
    for i in range(4):
        state, _, _ = agent_lib.train(state, sine_batch(seed=i), jax.random.PRNGKey(i))
    assert agent_lib.TRACE_COUNTS["train"] - before.get("train", 0) <= 1
    carry = agent_lib.initial_carry(state, 3)
    before = dict(agent_lib.TRACE_COUNTS)
    for i in range(5):
        obs = {"vector": np.full((3, 3), i, np.float32), "is_first": np.array([i == 0, False, i % 2 == 0])}
        action, carry = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(i))
        assert action.shape == (3, 2)
        np.testing.assert_array_equal(np.asarray(action).sum(-1), 1.0)  # exact one-hot
    assert agent_lib.TRACE_COUNTS["policy"] - before.get("policy", 0) <= 1
    del batch


def test_compiler_options_change_the_update_and_the_init_only_by_rounding():
    # The CPU options trade LLVM optimisation time for compile time. Kernels may order float32
    # operations differently. Over several updates the RMS-normalised step magnifies that in
    # near-zero gradient entries, and a rounding-level change can flip a sampled latent or action
    # (a 1/64 share of the imagined starts here), so compare single updates from the same trained
    # states loosely: a miscompiled program is off by far more.
    config = make_config(["debug"]).agent
    spec = tuple((k, s, t) for k, (s, t) in OBS_SPEC.items())
    key = jax.random.PRNGKey(4)
    init_default = jax.jit(agent_lib._init, static_argnums=(0, 1, 2))(config, spec, agent_lib.ActionSpec(2, True), key)
    state = agent_lib.init(config, OBS_SPEC, agent_lib.ActionSpec(2, True), key)
    for a, b in zip(jax.tree.leaves(init_default), jax.tree.leaves(state)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)  # init runs at -O0
    tuned = jax.jit(agent_lib._train, compiler_options=agent_lib.compiler_options("cpu"))
    default = jax.jit(agent_lib._train)
    for i in range(3):
        batch, step_key = sine_batch(seed=i), jax.random.PRNGKey(i)
        _, metrics_b, _ = tuned(state, batch, step_key)
        state, metrics_a, _ = default(state, batch, step_key)
        assert metrics_a.keys() == metrics_b.keys()
        for name in metrics_a:
            np.testing.assert_allclose(float(metrics_b[name]), float(metrics_a[name]), rtol=2e-2, atol=2e-3,
                                       err_msg=name)
    # the compared updates trained the zero-initialised heads (their outputs, and so the metrics, moved)
    for head in (state.world_model.reward_head, state.critic):
        out = [x for x in jax.tree.leaves(head) if eqx.is_array(x)]
        assert any(np.abs(np.asarray(x)).max() > 0 for x in out[-2:])


def test_compiler_options_unknown_to_this_xla_are_dropped():
    options = {"xla_backend_optimization_level": 2, "xla_cpu_no_such_option": True}
    assert agent_lib._supported(options) == {"xla_backend_optimization_level": 2}
    assert agent_lib._supported({"xla_cpu_no_such_option": True}) is None


def test_train_does_not_retrace_after_first_call_from_fresh_function():
    # A new agent with the same config and shapes reuses the compiled train step.
    state = tiny_agent(seed=2)
    state, _, _ = agent_lib.train(state, sine_batch(), jax.random.PRNGKey(0))
    before = agent_lib.TRACE_COUNTS["train"]
    other = tiny_agent(seed=3)
    other, _, _ = agent_lib.train(other, sine_batch(seed=5), jax.random.PRNGKey(1))
    assert agent_lib.TRACE_COUNTS["train"] == before


def test_policy_carry_resets_at_is_first():
    state = tiny_agent(seed=4)
    obs = lambda v, first: {"vector": np.full((2, 3), v, np.float32), "is_first": np.array(first)}
    key = jax.random.PRNGKey(7)
    # Env 0 runs a history, then starts a new episode; env 1 starts fresh at the same moment.
    carry = agent_lib.initial_carry(state, 2)
    for i, v in enumerate([0.5, -1.0, 2.0]):
        _, carry = agent_lib.policy(state, carry, obs(v, [i == 0, i == 0]), jax.random.PRNGKey(i))
    _, after_reset = agent_lib.policy(state, carry, obs(0.7, [True, True]), key)
    fresh = agent_lib.initial_carry(state, 2)
    _, from_fresh = agent_lib.policy(state, fresh, obs(0.7, [True, True]), key)
    for a, b in zip(jax.tree.leaves(after_reset), jax.tree.leaves(from_fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Without is_first the history matters: the state differs from the fresh one.
    _, continued = agent_lib.policy(state, carry, obs(0.7, [False, False]), key)
    assert not np.allclose(np.asarray(continued.latent.deter), np.asarray(from_fresh.latent.deter))


def test_continuous_actions_are_bounded():
    state = tiny_agent(discrete=False, seed=5)
    carry = agent_lib.initial_carry(state, 4)
    obs = {"vector": np.zeros((4, 3), np.float32), "is_first": np.ones(4, bool)}
    for greedy in (False, True):
        action, _ = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(0), greedy)
        assert action.shape == (4, 2) and np.all(np.abs(np.asarray(action)) <= 1.0)


def test_image_observations_train():
    spec = {"image": ((16, 16, 3), "uint8"), "vector": ((3,), "float32")}
    state = tiny_agent(obs_spec=spec, seed=6)
    batch = sine_batch()
    batch["image"] = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 16, 3), dtype=np.uint8)
    state, metrics, _ = agent_lib.train(state, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["loss/rec_image"]))


def test_first_predictions_are_exactly_zero():
    state = tiny_agent(seed=7)
    feat = jnp.ones((5, state.world_model.dynamics.feature_dim))
    assert np.all(np.asarray(state.world_model.reward(feat).mean()) == 0.0)
    assert np.all(np.asarray(state.critic(feat).mean()) == 0.0)


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="power of two"):
        tiny_agent(obs_spec={"image": ((12, 12, 3), "uint8")})


def test_actor_and_critic_learning_rates_scale_their_updates_only():
    """Halving actor_lr / quartering critic_lr scales those updates exactly, and leaves the world model's."""

    def deltas(**lrs):
        options = {"agent.optim.lr": 1e-3, "agent.optim.warmup": 0, **{f"agent.optim.{k}": v for k, v in lrs.items()}}
        config = make_config(["debug"], options)
        state = agent_lib.init(config.agent, OBS_SPEC, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(0))
        before = agent_lib.copy_state(state)
        after, _, _ = agent_lib.train(state, sine_batch(), jax.random.PRNGKey(1))
        diff = lambda a, b: [np.asarray(x) - np.asarray(y) for x, y in
                             zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array)))]
        return (diff(after.world_model, before.world_model), diff(after.actor, before.actor),
                diff(after.critic, before.critic))

    wm, actor, critic = deltas()
    wm2, actor2, critic2 = deltas(actor_lr=5e-4, critic_lr=2.5e-4)
    assert any(np.abs(d).max() > 0 for d in actor) and any(np.abs(d).max() > 0 for d in critic)
    for a, b in zip(wm, wm2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(actor, actor2):
        np.testing.assert_allclose(b, 0.5 * a, rtol=1e-4, atol=2e-7)  # float32 rounding of (param + update) - param
    for a, b in zip(critic, critic2):
        np.testing.assert_allclose(b, 0.25 * a, rtol=1e-4, atol=2e-7)  # float32 rounding of (param + update) - param


def test_init_works_inside_transformations_such_as_vmap_over_seeds():
    config = make_config(["debug"]).agent
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    init = lambda key: agent_lib.init(config, OBS_SPEC, agent_lib.ActionSpec(2, True), key)
    batched = jax.vmap(init)(keys)
    for i in range(2):
        single = init(keys[i])
        for b, s in zip(jax.tree.leaves(batched.params), jax.tree.leaves(single.params)):
            # the standalone init is compiled without backend optimisations: equal up to rounding
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(s), rtol=1e-5, atol=1e-6)


def test_replay_value_loss_reaches_the_world_model_only_with_repval_grad():
    import equinox as eqx

    batch = sine_batch()
    b, t = batch["is_first"].shape
    grads = {}
    for flag in (True, False):
        config = make_config(["debug"], {"agent.actor_critic.repval_grad": flag}).agent
        state = agent_lib.init(config, OBS_SPEC, agent_lib.ActionSpec(2, True), jax.random.PRNGKey(0))
        # the critic's output layer starts at zero, which would block every gradient into its input
        critic = eqx.tree_at(lambda c: c.out.weight, state.critic,
                             jax.random.normal(jax.random.PRNGKey(2), state.critic.out.weight.shape))

        def loss(params):
            wm, critic = params
            _, (post, _) = wm.loss(batch, wm.dynamics.initial(b), jax.random.PRNGKey(1))
            return agent_lib._replay_value_loss(wm, critic, state, batch, post, jnp.ones((b, t)), 0.99)[0]

        grads[flag] = eqx.filter_jit(eqx.filter_grad(loss))((state.world_model, critic))
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]
    assert any(np.abs(g).max() > 0 for g in leaves(grads[True][0].encoder))
    assert any(np.abs(g).max() > 0 for g in leaves(grads[True][0].dynamics))
    assert all(np.all(g == 0) for g in leaves(grads[False][0]))
    for a, c in zip(leaves(grads[True][1]), leaves(grads[False][1])):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)


def test_continue_target_is_discounted_with_contdisc():
    """2024 (contdisc): the continue head learns (1 - is_terminal) * gamma; 2023: 1 - is_terminal."""
    state = tiny_agent()
    wm = state.world_model
    batch = dict(sine_batch())
    batch["is_terminal"] = np.zeros_like(batch["is_terminal"])
    batch["is_terminal"][1, 5] = True
    b = batch["is_first"].shape[0]
    for discount in (1.0, 0.9):
        _, (post, metrics) = wm.loss(batch, wm.dynamics.initial(b), jax.random.PRNGKey(0), discount)
        logit = np.asarray(wm.cont(wm.dynamics.features(post)).logit, np.float64)
        target = discount * (1.0 - batch["is_terminal"])
        log_sig = lambda x: -np.logaddexp(0.0, -x)
        expected = -(target * log_sig(logit) + (1 - target) * log_sig(-logit)).mean()
        np.testing.assert_allclose(float(metrics["loss/cont"]), expected, rtol=1e-5)


def test_train_continues_from_the_context_step_latent():
    """With replay-context keys the first step is context: the first trained step's deter is the GRU
    of the stored latent and that step's action (or of the initial state where it starts an
    episode), and the returned latents cover the T trained steps. Without them, all T + 1 steps are
    trained from the initial state."""
    state = tiny_agent(seed=2)
    dyn = state.world_model.dynamics
    b, t = 4, 9
    batch = sine_batch(b, t)  # every row starts an episode at step 0 (the context step)
    batch["is_first"][2, 1] = True  # row 2's first trained step starts another
    rng = np.random.default_rng(0)
    deter, stoch, classes = dyn.config.deter, dyn.config.stoch, dyn.config.classes
    context = {"deter": rng.uniform(-0.9, 0.9, (b, deter)).astype(np.float16),
               "stoch": rng.integers(0, classes, (b, stoch)).astype(np.uint8)}
    assert set(agent_lib.latent_spec(state)) == {agent_lib.LATENT + k for k in context}
    with_context = {**batch, **{agent_lib.LATENT + k: np.repeat(v[:, None], t, 1) for k, v in context.items()}}

    start = dyn.from_entry(context)
    from_context = dyn._gru(start.deter, start.stoch, dyn._action_input(jnp.asarray(batch["action"][:, 1])))
    initial = dyn.initial(b)
    from_initial = dyn._gru(initial.deter, initial.stoch, dyn._action_input(jnp.zeros((b, 2))))
    expected = np.where(np.arange(b)[:, None] == 2, from_initial, from_context).astype(np.float16)
    assert np.abs(np.asarray(from_context) - np.asarray(from_initial)).max() > 0.05  # the context matters

    _, _, latents = agent_lib.train(agent_lib.copy_state(state), with_context, jax.random.PRNGKey(0))
    assert latents[agent_lib.LATENT + "deter"].shape == (b, t - 1, deter)
    assert latents[agent_lib.LATENT + "stoch"].shape == (b, t - 1, stoch)
    got = np.asarray(latents[agent_lib.LATENT + "deter"][:, 0], np.float32)
    np.testing.assert_allclose(got, expected.astype(np.float32), atol=2.0 ** -10)

    _, _, latents = agent_lib.train(state, batch, jax.random.PRNGKey(0))
    assert latents[agent_lib.LATENT + "deter"].shape == (b, t, deter)
    np.testing.assert_allclose(np.asarray(latents[agent_lib.LATENT + "deter"][:, 0], np.float32),
                               np.asarray(from_initial, np.float16).astype(np.float32), atol=2.0 ** -10)


def _matmul_dtypes(fn, *args) -> set[tuple[str, ...]]:
    """The operand dtypes of every matmul and convolution in `fn`'s jaxpr (sub-jaxprs included)."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bfloat16_compute_runs_every_matmul_in_bfloat16_and_keeps_parameters_float32(tmp_path):
    spec = {"image": ((16, 16, 3), "uint8"), "vector": ((3,), "float32")}
    batch = sine_batch()
    batch["image"] = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 16, 3), dtype=np.uint8)
    state = tiny_agent(obs_spec=spec, seed=8, **{"agent.compute_dtype": "bfloat16",
                                                 "agent.world_model.decoder_blocks": 2})
    key = jax.random.PRNGKey(0)
    # Forward and backward passes: world model, imagination, actor and critic.
    assert _matmul_dtypes(agent_lib._train, state, batch, key) == {("bfloat16", "bfloat16")}
    f32_state = tiny_agent(obs_spec=spec, seed=8, **{"agent.world_model.decoder_blocks": 2})
    assert _matmul_dtypes(agent_lib._train, f32_state, batch, key) == {("float32", "float32")}
    state, metrics, _ = agent_lib.train(state, batch, key)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    leaves = jax.tree.leaves((state.params, state.opt_state, state.slow_critic))
    assert {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {"float32"}
    carry = agent_lib.initial_carry(state, 2)
    assert carry.latent.deter.dtype == jnp.bfloat16 and carry.latent.logits.dtype == jnp.float32
    obs = {k: v[:2, 0] for k, v in batch.items() if k in spec} | {"is_first": np.ones(2, bool)}
    action, carry = agent_lib.policy(state, carry, obs, key)
    assert action.dtype == jnp.float32 and carry.latent.deter.dtype == jnp.bfloat16
    with Checkpointer(tmp_path) as ckpt:  # the bfloat16 carry round-trips exactly, as the loops save it
        ckpt.save(1, {"agent": state, "carry": carry}, None, {}, wait=True)
        restored = ckpt.restore({"agent": state, "carry": agent_lib.initial_carry(state, 2)}, None)[0]
    for x, y in zip(jax.tree.leaves((state, carry)), jax.tree.leaves((restored["agent"], restored["carry"]))):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_compute_lowers_the_world_model_loss_and_unknown_dtypes_are_refused():
    state = tiny_agent(**{"agent.compute_dtype": "bfloat16"})
    batch = sine_batch()
    losses = []
    for i in range(60):
        state, metrics, _ = agent_lib.train(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss/world_model"]))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    with pytest.raises(ValueError, match="unknown compute_dtype 'float16'"):
        tiny_agent(**{"agent.compute_dtype": "float16"})
