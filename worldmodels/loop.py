"""The host training loop around a gymnasium vector env.

train_ratio is the number of REPLAYED steps per ENVIRONMENT step. One update replays
`batch_size * seq_len` steps, so the loop makes `train_ratio / (batch_size * seq_len)` updates per
environment step. Example: batch 16 x 64 = 1024 replayed steps per update; with train_ratio 64 that
is one update every 16 environment steps (counting every env of a vector env), and with 4 envs one
update every 4 vector steps. With `replay_context` (DreamerV3 2024, the default) each window has one
step more, whose stored latent the update starts from; that context step is not counted as replayed.

The step convention (see `WorldModel.loss`): step t stores o_t, the action a_{t-1} that led to it
(zero at is_first), r_t, is_first, is_last and is_terminal (and, with replay context, the posterior
latent inferred from o_t: the policy's, then each update's for the steps it trained on). The vector
env runs in gymnasium's NEXT_STEP autoreset mode, so an episode's last observation is stored as its
own step and the next vector step returns the reset observation.
"""

from __future__ import annotations

import functools
import pickle
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from worldmodels import agent as agent_lib
from worldmodels import spaces
from worldmodels.checkpoint import Checkpointer
from worldmodels.config import Config, dumps, to_dict, validate
from worldmodels.logging import RecentReturns, RunLogger, final_evaluation_report, recent_window
from worldmodels.replay import ReplayBuffer
from worldmodels.resume import (RESUME_MAY_CHANGE, ConfigMismatchError, StopOnInterrupt,  # noqa: F401
                                check_resumable, restore_usable, save_or_warn)

EnvFn = Callable[[int], gym.Env]  # seed -> a single (not vector) env
# env factories (no arguments) -> a vector env in NEXT_STEP autoreset mode, e.g. envs.parallel.ParallelVectorEnv
VectorEnvFn = Callable[[list[Callable[[], gym.Env]]], gym.vector.VectorEnv]


class NonFiniteUpdatesError(FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient (see `run.max_skipped_updates`)."""


class EnvOutputError(ValueError):
    """An env returned an observation or reward the agent cannot learn from (NaN, inf, wrong shape)."""


def _make_vector_env(env_fn: EnvFn, config: Config,
                     parallel_vector_env: VectorEnvFn | None = None) -> gym.vector.VectorEnv:
    # partial, not a closure over `config`: env processes unpickle the factories, and the config
    # would import JAX in each of them.
    fns = [functools.partial(env_fn, config.run.seed + i) for i in range(config.run.num_envs)]
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if not config.run.parallel_envs:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    if parallel_vector_env is None:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    envs = parallel_vector_env(fns)
    if envs.metadata.get("autoreset_mode") != mode:
        envs.close()
        raise ValueError(f"the parallel vector env must autoreset in NEXT_STEP mode, not "
                         f"{envs.metadata.get('autoreset_mode')!r}")
    return envs


def _env_state(envs: gym.vector.SyncVectorEnv) -> dict[str, Any]:
    """What resuming a SyncVectorEnv exactly needs: its envs and which of them reset on the next step."""
    return {"envs": envs.envs, "autoreset": np.array(envs._autoreset_envs)}


def _set_env_state(envs: gym.vector.SyncVectorEnv, saved: dict[str, Any]) -> None:
    for env in envs.envs:
        env.close()
    envs.envs = saved["envs"]
    envs._autoreset_envs = saved["autoreset"]


def evaluate(state: agent_lib.AgentState, env: gym.Env, episodes: int, key: jax.Array,
             max_steps: int = 100_000) -> list[tuple[float, int]]:
    """Greedy episodes on a single env: [(return, length)]."""
    space = env.observation_space
    results = []
    for _ in range(episodes):
        obs, _ = env.reset()
        carry = agent_lib.initial_carry(state, 1)
        is_first, total, length = True, 0.0, 0
        while length < max_steps:
            key, k = jax.random.split(key)
            batch = spaces.batch_obs(space, jax.tree.map(lambda x: np.asarray(x)[None], obs), 1)
            action, carry = agent_lib.policy(state, carry, {**batch, "is_first": np.array([is_first])}, k, True)
            obs, reward, terminated, truncated, _ = env.step(spaces.env_actions(env.action_space, action)[0])
            total += float(reward)
            length += 1
            is_first = False
            if terminated or truncated:
                break
        results.append((total, length))
    return results


def run(config: Config, env_fn: EnvFn, parallel_vector_env: VectorEnvFn | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `config.run.logdir` until `config.run.steps` environment steps.

    With `config.run.parallel_envs`, the envs run in processes: in `parallel_vector_env(factories)`
    if given (e.g. `envs.parallel.ParallelVectorEnv`, which restarts crashed env processes and marks
    them in ``info["restarted"]``: their episode is dropped and the next step starts a new one),
    else in gymnasium's AsyncVectorEnv.

    A run that reaches its budget ends with `run.final_eval_episodes` greedy episodes (logged as
    `eval` scores, printed beside the training return).

    **Returns:** a summary: env steps, updates, episodes, `recent_return` (the mean return of the
    `recent_episodes` that ended in the last `recent_window_steps` env steps), `eval_return` and
    `eval_returns` (the greedy episodes at the end, when they ran), wall time, and
    `first_update_seconds`: seconds from the call to the end of the first update (set-up, init, compile).
    """
    validate(config)  # before anything is built or compiled
    rc = config.run
    run_start = time.perf_counter()
    first_update_seconds = None  # from here to the end of the first update: set-up, init, compile
    logdir = Path(rc.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    check_resumable(logdir, config)

    envs = _make_vector_env(env_fn, config, parallel_vector_env)
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    obs_spec = spaces.obs_spec(obs_space)
    act_spec = spaces.action_spec(act_space)
    n = rc.num_envs
    state = agent_lib.init(config.agent, obs_spec, act_spec, jax.random.PRNGKey(rc.seed))
    print(f"agent: {agent_lib.count_params(state.params):,} parameters; observations {obs_spec}; actions {act_spec}")
    latent_spec = agent_lib.latent_spec(state) if rc.replay_context else {}
    replay = ReplayBuffer({**spaces.step_spec(obs_space, act_spec), **latent_spec}, rc.replay_capacity, n)
    print(replay.describe())
    key = jax.random.PRNGKey(rc.seed + 1)
    rng = np.random.default_rng(rc.seed)
    carry = agent_lib.initial_carry(state, n)
    counters = {"env_steps": 0, "updates": 0, "episodes": 0, "train_credit": 0.0, "last_log": 0,
                "last_eval": 0, "last_checkpoint": 0}
    pending: dict[str, np.ndarray] = {}  # the step observed but not yet stored
    episode_return, episode_length = np.zeros(n), np.zeros(n, np.int64)

    recent = RecentReturns(recent_window(rc.steps))  # the episodes that ended in the run's last tenth
    ckpt = Checkpointer(logdir / "checkpoints", max_to_keep=2)
    resumed = ckpt.latest_step() is not None
    if resumed:
        def restore_step(step: int) -> tuple:
            saved_meta = ckpt.read_meta(step)
            if saved_meta.get("loop") == "device":
                raise ConfigMismatchError(f"{logdir} holds a run of the device loop: resume it with --device-loop, "
                                          "or pass a new --run.logdir.")
            agent_template = {"agent": state, "carry": carry, "key": key}
            # The metadata gives the shapes that the replay's restore target needs: the stored steps (older
            # checkpoints saved the whole ring) and the pending step.
            replay_template = {**replay.state_template(saved_meta.get("replay_stored", replay.capacity_per_env)),
                               "loop/episode_return": episode_return, "loop/episode_length": episode_length}
            pending_keys = saved_meta["pending_keys"]
            replay_template.update({f"pending/{k}": np.zeros(tuple(s), d) for k, (s, d) in pending_keys.items()})
            restored = ckpt.restore(agent_template, replay_template, step=step)
            replay.load_state_dict({k: v for k, v in restored[1].items() if k.startswith(("data/", "counter/"))})
            return restored

        restored, replay_state, meta, blobs = restore_usable(ckpt, logdir, restore_step)
        state, carry, key = restored["agent"], restored["carry"], restored["key"]
        pending = {k[len("pending/"):]: v for k, v in replay_state.items() if k.startswith("pending/")}
        episode_return, episode_length = replay_state["loop/episode_return"], replay_state["loop/episode_length"]
        counters = meta["counters"]
        recent.load(meta.get("recent_returns", []), counters["env_steps"])
        rng.bit_generator.state = meta["rng"]
        saved_envs = None
        if "envs" in blobs and not rc.parallel_envs:
            try:
                saved_envs = pickle.loads(blobs["envs"])
            except Exception as e:  # e.g. wrappers that forward attribute lookups before they are set up
                warnings.warn(f"the saved environments could not be unpickled ({e!r}): they restart with new "
                              "episodes")
        if saved_envs is not None:
            _set_env_state(envs, saved_envs)
        else:
            if "envs" not in blobs:
                warnings.warn("environment state was not saved with the checkpoint (not picklable): the "
                              "envs restart with new episodes")
            pending = {}
        print(f"resumed from {logdir} at env step {counters['env_steps']} ({counters['updates']} updates)")
    (logdir / "config.json").write_text(dumps(config))

    # The train step compiles in a thread while the envs take their first steps (train_start): XLA's
    # compile releases the GIL, so the envs and the policy mostly run on the other core meanwhile. It is
    # traced and lowered here, under the caller's thread-local JAX settings (e.g. jax.default_device),
    # and for the restored state and key when resuming (restored arrays are committed to a device): both
    # are part of jit's cache key.
    background = ThreadPoolExecutor(1, thread_name_prefix="compile-train")
    batch_shapes = {k: jax.ShapeDtypeStruct((rc.batch_size, rc.window, *shape), dtype)
                    for k, (shape, dtype) in replay.spec.items()}
    train_compiled = Future()
    if rc.train_ratio > 0 and rc.steps > max(rc.train_start, counters["env_steps"]):
        try:
            train_compiled = background.submit(agent_lib.lower_train(state, batch_shapes, key).compile)
        except Exception as e:  # raised at the first update, as a compile error is, so the clean-up below runs
            train_compiled.set_exception(e)
    else:  # no updates to come
        train_compiled.set_result(None)

    if not pending:
        obs, _ = envs.reset(seed=rc.seed + 7919 * counters["env_steps"])
        pending = {**spaces.batch_obs(obs_space, obs, n), "reward": np.zeros(n, np.float32),
                   "is_first": np.ones(n, bool), "is_last": np.zeros(n, bool), "is_terminal": np.zeros(n, bool),
                   "action": np.zeros((n, act_spec.dim), np.float32)}
        episode_return[:], episode_length[:] = 0.0, 0
        carry = agent_lib.initial_carry(state, n)

    logger = RunLogger(logdir, rc.tensorboard, start_step=counters["env_steps"])
    eval_env = env_fn(rc.seed + 100_000) if rc.eval_every else None
    replayed_per_update = rc.batch_size * rc.seq_len
    pending_metrics: list[dict] = []
    unchecked: list[dict] = []  # metrics of the updates not yet checked for skips
    skipped_in_a_row = 0
    start_time, start_steps, start_updates = time.time(), counters["env_steps"], counters["updates"]

    saved: list[int] = []  # the steps checkpointed by this call

    def checkpoint(wait: bool = False) -> None:
        blobs = {}
        if not rc.parallel_envs:
            try:
                blobs["envs"] = pickle.dumps(_env_state(envs))
            except Exception as e:  # MuJoCo handles and similar: resume will restart episodes
                warnings.warn(f"could not pickle the environments ({e}); a resume restarts their episodes")
        replay_state = {**replay.state_dict(), **{f"pending/{k}": v for k, v in pending.items()},
                        "loop/episode_return": episode_return, "loop/episode_length": episode_length}
        meta = {"counters": counters, "rng": rng.bit_generator.state, "recent_returns": recent.state(),
                "replay_stored": replay.stored_per_env,
                "pending_keys": {k: [list(v.shape), str(v.dtype)] for k, v in pending.items()},
                "config": to_dict(config)}
        step = counters["env_steps"]
        # set before the save, so that the checkpoint holds it (a resumed run does not save again at once),
        # and after a full disk the next try comes at the next interval
        counters["last_checkpoint"] = step
        if save_or_warn(lambda: ckpt.save(step, {"agent": state, "carry": carry, "key": key}, replay_state, meta,
                                          blobs, wait=wait), step, ckpt):
            saved.append(step)

    def check_skipped(batch: dict[str, np.ndarray]) -> None:
        """Stop the run after `run.max_skipped_updates` updates in a row that the non-finite guard
        skipped, writing the last one's batch to the run dir (the last checkpoint stays resumable)."""
        nonlocal skipped_in_a_row
        flags, last = jax.device_get(([m["train/skipped"] for m in unchecked], unchecked[-1]))  # one transfer
        for flag in flags:
            skipped_in_a_row = skipped_in_a_row + 1 if flag else 0
        unchecked.clear()
        if skipped_in_a_row < rc.max_skipped_updates:
            return
        path = logdir / f"nonfinite_batch_update{counters['updates']}.npz"
        np.savez_compressed(path, **batch)
        # the loss terms in the order the update computes them: the world model's, then the critic's and actor's
        later = ["loss/repval", "loss/critic", "loss/actor", "loss/world_model", "loss/total"]
        order = sorted(k for k in last if k.startswith("loss/") and k not in later) + later
        terms = [k for k in order if k in last and not np.isfinite(last[k])]
        previous = ckpt.all_steps()
        raise NonFiniteUpdatesError(
            f"{skipped_in_a_row} updates in a row had a non-finite loss or gradient, the last at env step "
            f"{counters['env_steps']} (update {counters['updates']}); its first non-finite loss term: "
            f"{terms[0] if terms else 'none (the gradients)'}. Its batch is in {path}. "
            + (f"The checkpoint of step {previous[-1]} is the last good one: resume from it after a fix (e.g. a "
               "lower --agent.optim.lr)." if previous else "There is no checkpoint yet."))

    def log_metrics(steps: int) -> None:
        nonlocal pending_metrics
        elapsed = max(time.time() - start_time, 1e-9)
        values = {"env_steps_per_s": (steps - start_steps) / elapsed,
                  "updates_per_s": (counters["updates"] - start_updates) / elapsed,
                  "updates": counters["updates"], "episodes": counters["episodes"]}
        recent_returns = recent.returns(steps)
        if recent_returns:
            values["train/return_recent"] = float(np.mean(recent_returns))
            values["train/return_recent_episodes"] = len(recent_returns)
        if pending_metrics:
            stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *pending_metrics))
            values.update({k: float(np.mean(v)) for k, v in stacked.items()})
            values["train/skipped_updates"] = int(np.sum(stacked["train/skipped"]))
            pending_metrics = []
        logger.metrics(steps, values)
        if progress is not None:
            progress.set_postfix({"env/s": f"{values['env_steps_per_s']:.0f}",
                                  "upd/s": f"{values['updates_per_s']:.2f}",
                                  "return": f"{values.get('train/return_recent', float('nan')):.1f} "
                                            f"({len(recent_returns)} ep)"})

    progress = None
    if rc.progress:
        from tqdm import tqdm

        progress = tqdm(total=rc.steps, initial=counters["env_steps"], unit="step", dynamic_ncols=True)

    final_eval: dict[str, Any] = {}
    clean_exit = False
    try:
        with StopOnInterrupt() as flag:
            while counters["env_steps"] < rc.steps and not flag.stop:
                # 1. act on the pending step, store it (with the latent the policy inferred), step the envs
                key, k_act = jax.random.split(key)
                obs_in = {k: v for k, v in pending.items() if k not in ("action", "reward", "is_last", "is_terminal")}
                action, carry = agent_lib.policy(state, carry, obs_in, k_act)
                latent = agent_lib.replay_latent(state, carry) if rc.replay_context else {}
                action, latent = jax.device_get((action, latent))  # one wait for both
                replay.add({**pending, **latent})
                done = pending["is_last"]
                obs, reward, terminated, truncated, info = envs.step(spaces.env_actions(act_space, action))
                problem = spaces.output_problem(obs_space, obs, reward, n)
                if problem is not None:  # before it reaches replay (parallel envs restart such an env themselves)
                    i, name, what = problem
                    raise EnvOutputError(f"env {rc.env!r} (env {i} of {n}) returned {what} for {name!r} at env step "
                                         f"{counters['env_steps'] + n}; fix or wrap the env, or run it with "
                                         "--run.parallel-envs, which restarts an env that does this")
                # envs that had finished were reset by this step (NEXT_STEP autoreset); a restarted env
                # process also starts a new episode here, and its unfinished one is dropped (not scored)
                first = done | np.asarray(info.get("restarted", np.zeros(n, bool)), bool)
                is_last = (terminated | truncated) & ~first
                pending = {**spaces.batch_obs(obs_space, obs, n), "reward": np.asarray(reward, np.float32),
                           "is_first": first, "is_last": is_last, "is_terminal": terminated & ~first,
                           "action": np.where(first[:, None], 0.0, action).astype(np.float32)}
                episode_return = np.where(first, 0.0, episode_return + pending["reward"])
                episode_length = np.where(first, 0, episode_length + 1)
                counters["env_steps"] += n
                for i in np.flatnonzero(is_last):
                    counters["episodes"] += 1
                    recent.add(counters["env_steps"], float(episode_return[i]))
                    logger.score(counters["env_steps"], "train", episode_return[i], episode_length[i])

                # 2. train: train_ratio replayed steps per env step
                if counters["env_steps"] >= rc.train_start and replay.can_sample(rc.window):
                    counters["train_credit"] += n * rc.train_ratio / replayed_per_update
                    if counters["train_credit"] >= 1.0:
                        train_compiled.result()  # re-raises what went wrong in the compile, if anything
                    while counters["train_credit"] >= 1.0:
                        batch, windows = replay.sample_windows(rc.batch_size, rc.window, rng)
                        key, k_train = jax.random.split(key)
                        state, metrics, latents = agent_lib.train(state, batch, k_train)
                        if rc.replay_context:  # the trained steps' new posteriors replace the stored ones
                            replay.update(windows, jax.device_get(latents), offset=1)
                        if first_update_seconds is None:
                            jax.block_until_ready(metrics)
                            first_update_seconds = time.perf_counter() - run_start
                        pending_metrics.append(metrics)
                        unchecked.append(metrics)
                        counters["updates"] += 1
                        counters["train_credit"] -= 1.0
                        if rc.max_skipped_updates and len(unchecked) >= rc.max_skipped_updates:
                            check_skipped(batch)  # one host sync per max_skipped_updates updates

                # 3. log, evaluate, checkpoint
                steps = counters["env_steps"]
                if steps - counters["last_log"] >= rc.log_every:
                    counters["last_log"] = steps
                    log_metrics(steps)
                if eval_env is not None and steps - counters["last_eval"] >= rc.eval_every:
                    counters["last_eval"] = steps
                    # a key of its own (not split from the loop's), so evaluating never changes training
                    k_eval = jax.random.fold_in(jax.random.PRNGKey(rc.seed + 2), steps)
                    results = evaluate(state, eval_env, rc.eval_episodes, k_eval)
                    for ret, length in results:
                        logger.score(steps, "eval", ret, length)
                if rc.checkpoint_every and steps - counters["last_checkpoint"] >= rc.checkpoint_every:
                    checkpoint()
                if progress is not None:
                    progress.update(n)
            if counters["env_steps"] >= rc.steps > start_steps and rc.final_eval_episodes > 0:
                if progress is not None:
                    progress.close()
                if eval_env is None:
                    eval_env = env_fn(rc.seed + 100_000)
                key_eval = jax.random.fold_in(jax.random.PRNGKey(rc.seed + 3), counters["env_steps"])
                results = evaluate(state, eval_env, rc.final_eval_episodes, key_eval)
                final_eval = final_evaluation_report(logger, counters["env_steps"], *zip(*results), recent)
        clean_exit = True
    finally:
        # Only a loop that stopped at a step boundary is consistent enough to save; after a crash the
        # previous checkpoint stays the one to resume from.
        if clean_exit and pending_metrics:  # the updates since the last log (the log schedule stays)
            log_metrics(counters["env_steps"])
        if clean_exit and (counters["last_checkpoint"] != counters["env_steps"] or not (saved or ckpt.all_steps())):
            checkpoint(wait=True)
        ckpt.close()
        logger.close()
        if progress is not None:
            progress.close()
        envs.close()
        if eval_env is not None:
            eval_env.close()
        # A thread cannot be stopped inside XLA, and exiting under it aborts the process: let it finish.
        if not train_compiled.done():
            print("waiting for the train step to finish compiling before exiting")
        background.shutdown(wait=True)

    elapsed = time.time() - start_time
    return {"env_steps": counters["env_steps"], "updates": counters["updates"], "episodes": counters["episodes"],
            "recent_return": recent.mean(counters["env_steps"]),
            "recent_episodes": len(recent.returns(counters["env_steps"])), "recent_window_steps": recent.window,
            **final_eval, "seconds": elapsed, "first_update_seconds": first_update_seconds, "state": state}
from worldmodels.device_loop import run_on_device  # noqa: E402,F401  (the device loop for JAX envs)
