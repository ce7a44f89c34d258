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
import json
import pickle
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from worldmodels import agent as agent_lib
from worldmodels import offline, sharding, signing, spaces
from worldmodels.checkpoint import Checkpointer, ProcessShardCheckpointer
from worldmodels.config import VIDEO_CONTEXT, VIDEO_LENGTH, Config, dumps, to_dict, validate
from worldmodels.logging import RecentReturns, RunLogger, final_evaluation_report, recent_window
from worldmodels.replay import ReplayBuffer
from worldmodels.resume import (RESUME_MAY_CHANGE, ConfigMismatchError, NonFiniteUpdatesError,  # noqa: F401
                                StopOnInterrupt, check_resumable, nonfinite_updates_error, restore_usable,
                                save_or_warn, skipped_in_a_row)

EnvFn = Callable[[int], gym.Env]  # seed -> a single (not vector) env
# env factories (no arguments) -> a vector env in NEXT_STEP autoreset mode, e.g. envs.parallel.ParallelVectorEnv
VectorEnvFn = Callable[[list[Callable[[], gym.Env]]], gym.vector.VectorEnv]


class EnvOutputError(ValueError):
    """An env returned an observation or reward the agent cannot learn from (NaN, inf, wrong shape)."""


def _make_vector_env(env_fn: EnvFn, config: Config, parallel_vector_env: VectorEnvFn | None = None,
                     first_env: int = 0) -> gym.vector.VectorEnv:
    # partial, not a closure over `config`: env processes unpickle the factories, and the config
    # would import JAX in each of them.
    fns = [functools.partial(env_fn, config.run.seed + first_env + i) for i in range(config.run.num_envs)]
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
             max_steps: int = 100_000, recording: dict[str, np.ndarray] | None = None,
             record_steps: int = 0) -> list[tuple[float, int]]:
    """Greedy episodes on a single env: [(return, length)].

    With a `recording` dict, the first episode's first `record_steps` steps go into it as a batch
    of one sequence (`[1, T]`: observation keys, `action` into each step, `is_first`), e.g. for
    `agent.open_loop_video`.
    """
    space = env.observation_space
    results, steps = [], []
    for episode in range(episodes):
        obs, _ = env.reset()
        carry = agent_lib.initial_carry(state, 1)
        is_first, total, length = True, 0.0, 0
        action = np.zeros((1, state.action_spec.dim), np.float32)
        while length < max_steps:
            key, k = jax.random.split(key)
            batch = spaces.batch_obs(space, jax.tree.map(lambda x: np.asarray(x)[None], obs), 1)
            if recording is not None and episode == 0 and length < record_steps:
                steps.append({**batch, "action": np.asarray(action, np.float32), "is_first": np.array([is_first])})
            action, carry = agent_lib.policy(state, carry, {**batch, "is_first": np.array([is_first])}, k, True)
            obs, reward, terminated, truncated, _ = env.step(spaces.env_actions(env.action_space, action)[0])
            total += float(reward)
            length += 1
            is_first = False
            if terminated or truncated:
                break
        results.append((total, length))
    if recording is not None and steps:
        recording.update({k: np.stack([s[k] for s in steps], 1) for k in steps[0]})
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
    host = HostRun(config, env_fn, parallel_vector_env)  # set up, or resume from the last checkpoint
    clean_exit = False
    try:
        with StopOnInterrupt() as interrupt:
            while not host.budget_spent() and not host.stop_requested(interrupt.stop):
                host.collect()
                host.train()
                host.log_evaluate_checkpoint()
            host.final_evaluation()
        clean_exit = True
    finally:
        host.close(clean_exit)
    return host.summary()


class _Steps:
    """A checkpointer seen through the steps that every process has (for `restore_usable`)."""

    def __init__(self, checkpoints: Any, steps: list[int]):
        self.directory, self._steps = checkpoints.directory, steps

    def all_steps(self) -> list[int]:
        return self._steps


class HostRun:
    """The host loop's phases over one run directory, and the state they share.

    `__init__` sets up (envs, agent, replay) or resumes from the last usable checkpoint and starts
    compiling the train step; each iteration of `run` then calls `collect` (one vector step),
    `train` (the updates the train ratio owes) and `log_evaluate_checkpoint`; `final_evaluation`
    and `close` end it.

    Many processes (`jax.distributed`, see `worldmodels.sharding`): each process steps its own
    `run.num_envs` envs and owns its replay shard; every update trains on a global batch of
    `run.batch_size` made of each process's `batch_size / processes` rows. The counters (env steps,
    updates) are global, so every process makes the same calls in the same order. Process 0 writes
    the run's logs, evaluations, videos and the agent's checkpoint; process k writes its replay shard
    and its episodes' scores under `<logdir>/process<k>/`.
    """

    def __init__(self, config: Config, env_fn: EnvFn, parallel_vector_env: VectorEnvFn | None = None):
        rc = self.rc = config.run
        self.config, self.env_fn = config, env_fn
        self.run_start = time.perf_counter()
        self.first_update_seconds = None  # from here to the end of the first update: set-up, init, compile
        self.logdir = Path(rc.logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        check_resumable(self.logdir, config)
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.main = self.process == 0  # writes the run's logs, evaluations and the agent's checkpoint
        self.own_dir = self.logdir if self.main else self.logdir / f"process{self.process}"
        self.first_env = self.process * rc.num_envs  # this process's envs in the run's numbering (seeds)
        self._policy_state = None  # with many processes, this process's copy of the state (policy_state)

        self.envs = _make_vector_env(env_fn, config, parallel_vector_env, self.first_env)
        try:
            self._set_up()
        except BaseException:
            self.envs.close()
            raise
        self._start_compiling_train_step()
        if not self.pending:
            self._reset_envs()
        if self.main:
            self.logger = RunLogger(self.logdir, rc.tensorboard, start_step=self.counters["env_steps"],
                                    wandb_project=rc.wandb, config=to_dict(self.config))
        else:  # this process's episode scores and metrics only
            self.logger = RunLogger(self.own_dir, False, start_step=self.counters["env_steps"])
        self.eval_env = env_fn(rc.seed + 100_000) if rc.eval_every and self.main else None
        self.pending_metrics: list[dict] = []
        self.unchecked: list[dict] = []  # metrics of the updates not yet checked for skips
        self.skipped_in_a_row = 0
        self.start_time, self.start_steps = time.time(), self.counters["env_steps"]
        self.start_updates = self.counters["updates"]
        self.saved: list[int] = []  # the steps checkpointed by this call
        self.final_eval: dict[str, Any] = {}
        self.progress = None
        if rc.progress and self.main:
            from tqdm import tqdm

            self.progress = tqdm(total=rc.steps, initial=self.counters["env_steps"], unit="step", dynamic_ncols=True)

    # -- set up or resume --------------------------------------------------------------------

    def _set_up(self) -> None:
        """The agent, replay, counters and PRNG state: fresh, or restored from the last usable checkpoint."""
        rc, envs = self.rc, self.envs
        self.obs_space, self.act_space = envs.single_observation_space, envs.single_action_space
        self.act_spec = spaces.action_spec(self.act_space)
        obs_spec = spaces.obs_spec(self.obs_space)
        if (rc.video_every or rc.eval_video) and not any(len(shape) == 3 for shape, _ in obs_spec.values()):
            raise ValueError(f"--run.video-every / --run.eval-video: env {rc.env!r} has no image observations "
                             f"({obs_spec}); open-loop videos show predicted images. Drop the option, or use an "
                             "image env (e.g. dmc-vision/...)")
        n = self.n = rc.num_envs
        self.state = agent_lib.init(self.config.agent, obs_spec, self.act_spec, jax.random.PRNGKey(rc.seed))
        print(f"agent: {agent_lib.count_params(self.state.params):,} parameters; observations {obs_spec}; "
              f"actions {self.act_spec}")
        self.key = jax.random.PRNGKey(rc.seed + 1)
        if self.config.agent.init_world_model and not (self.logdir / "checkpoints").is_dir():
            # a fresh run starts from a world model trained offline (a resume restores its own)
            wm = offline.load_world_model(self.config.agent.init_world_model, self.config, self.obs_space,
                                          self.act_space)
            self.state = eqx.tree_at(lambda s: s.world_model, self.state, wm)
            print(f"world model from {self.config.agent.init_world_model}")
        # Many devices: the state and keys on every device, each batch split along B over them (and the
        # env batch too, where the device count divides it; with many processes each acts on its own
        # device). One device: no mesh, the plain programs.
        mesh = sharding.make_mesh(rc.mesh)
        self.mesh = mesh if sharding.data_size(mesh) > 1 or self.processes > 1 else None
        self.split_envs = self.mesh is not None and self.processes == 1 and n % sharding.data_size(mesh) == 0
        if self.mesh is not None:
            sharding.check_batch("--run.batch-size", rc.batch_size, mesh)
        latent_spec = agent_lib.latent_spec(self.state) if rc.replay_context else {}
        self.replay = ReplayBuffer({**spaces.step_spec(self.obs_space, self.act_spec), **latent_spec},
                                   rc.replay_capacity, n)
        print(self.replay.describe())
        self.rng = np.random.default_rng(rc.seed if self.main else [rc.seed, self.process])
        self.carry = self._initial_carry()
        self.counters = {"env_steps": 0, "updates": 0, "episodes": 0, "train_credit": 0.0, "last_log": 0,
                         "last_eval": 0, "last_checkpoint": 0}
        self.pending: dict[str, np.ndarray] = {}  # the step observed but not yet stored
        self.episode_return, self.episode_length = np.zeros(n), np.zeros(n, np.int64)
        self.recent = RecentReturns(recent_window(rc.steps))  # the episodes that ended in the run's last tenth
        if self.processes == 1:
            self.ckpt = Checkpointer(self.logdir / "checkpoints", max_to_keep=2)
        elif self.main:
            self.ckpt = Checkpointer(self.logdir / "checkpoints", max_to_keep=2, this_process_only=True)
        else:  # its replay shard, carry and envs: orbax writes numpy from process 0 only
            self.ckpt = ProcessShardCheckpointer(self.own_dir / "checkpoints", max_to_keep=2)
        self.recording: list[list | None] = [None] * n  # --run.save-episodes: each env's episode so far
        steps = self.ckpt.all_steps()
        if self.processes > 1:
            steps = sharding.all_processes_steps(steps)
        if steps:
            self._resume(steps)
        if self.processes > 1:  # the same agent everywhere, process 0's
            self.state = sharding.broadcast_from_process_0(self.state)
        if self.mesh is not None:
            self.state = sharding.put_state(self.state, mesh)
            if self.processes == 1:  # many processes: the key stays on each (the same everywhere)
                self.key = sharding.put_replicated(self.key, mesh)
            fsdp = f", the agent state's big arrays split over {mesh.shape[sharding.FSDP]} (fsdp)" \
                if sharding.FSDP in mesh.axis_names else ""
            print(f"mesh: {sharding.data_size(mesh)} devices on the data axis ({jax.devices()[0].platform}"
                  + (f", {self.processes} processes" if self.processes > 1 else "") + f"); each batch of "
                  f"{rc.batch_size} split over them" + (", and the env batch" if self.split_envs else "") + fsdp)
        else:  # committed to its device, as restored arrays are: a fresh and a resumed run share one compile
            self.state, self.carry, self.key = sharding.put_committed((self.state, self.carry, self.key))
        self._policy_state = sharding.local_copy(self.state) if self.processes > 1 else None
        if not self.main:
            return
        (self.logdir / "config.json").write_text(dumps(self.config))
        # what the agent reads and writes, so that worldmodels.load acts without making the env (and
        # what recorded episodes hold)
        spaces_json = json.dumps(spaces.env_spaces_to_dict(self.obs_space, self.act_space))
        (self.logdir / "spaces.json").write_text(spaces_json)
        if rc.save_episodes:
            (self.logdir / "episodes").mkdir(exist_ok=True)
            (self.logdir / "episodes" / "spaces.json").write_text(spaces_json)

    def _resume(self, steps: list[int]) -> None:
        """Restore the newest of `steps` (every process has them) that reads."""
        ckpt, logdir, replay = self.ckpt, self.logdir, self.replay

        def restore_step(step: int) -> tuple:
            saved_meta = ckpt.read_meta(step)
            if saved_meta.get("loop") == "device":
                raise ConfigMismatchError(f"{logdir} holds a run of the device loop: resume it with --device-loop, "
                                          "or pass a new --run.logdir.")
            if saved_meta.get("processes", 1) != self.processes:
                raise ConfigMismatchError(f"{logdir} holds a run of {saved_meta.get('processes', 1)} process(es); "
                                          f"this one has {self.processes}: resume it with "
                                          f"--run.num-processes {saved_meta.get('processes', 1)}, or pass a new "
                                          "--run.logdir.")
            agent_template = {"agent": self.state, "carry": self.carry, "key": self.key}
            if self.processes > 1:  # process 0 restores the agent (and sends it to the others) as numpy
                agent_template = jax.device_get(agent_template if self.main else
                                                {"carry": self.carry, "key": self.key})
            # The metadata gives the shapes that the replay's restore target needs: the stored steps (older
            # checkpoints saved the whole ring) and the pending step.
            replay_template = {**replay.state_template(saved_meta.get("replay_stored", replay.capacity_per_env)),
                               "loop/episode_return": self.episode_return, "loop/episode_length": self.episode_length}
            pending_keys = saved_meta["pending_keys"]
            replay_template.update({f"pending/{k}": np.zeros(tuple(s), d) for k, (s, d) in pending_keys.items()})
            restored = ckpt.restore(agent_template, replay_template, step=step)
            replay.load_state_dict({k: v for k, v in restored[1].items() if k.startswith(("data/", "counter/"))})
            return restored

        restored, replay_state, meta, blobs = restore_usable(_Steps(ckpt, steps), logdir, restore_step)
        if self.processes > 1 and len(set(sharding.all_processes_steps([meta["counters"]["env_steps"]]))) != 1:
            raise RuntimeError(f"the processes of {logdir} resumed from different checkpoints (one was unreadable "
                               "in some process): delete the newest step in every process's checkpoints and resume")
        self.state, self.carry, self.key = restored.get("agent", self.state), restored["carry"], restored["key"]
        if self.processes > 1:  # numpy: onto this process's device
            self.carry, self.key = jax.device_put((self.carry, self.key))
        self.pending = {k[len("pending/"):]: v for k, v in replay_state.items() if k.startswith("pending/")}
        self.episode_return = replay_state["loop/episode_return"]
        self.episode_length = replay_state["loop/episode_length"]
        self.counters = meta["counters"]
        self.recent.load(meta.get("recent_returns", []), self.counters["env_steps"])
        self.rng.bit_generator.state = meta["rng"]
        saved_envs = None
        if "envs" in blobs and not self.rc.parallel_envs:
            if signing.verify(blobs["envs"], meta.get("envs_signature")) or self.rc.trust_env_pickle:
                try:
                    saved_envs = pickle.loads(blobs["envs"])
                except Exception as e:  # e.g. wrappers that forward attribute lookups before they are set up
                    warnings.warn(f"the saved environments could not be unpickled ({e!r}): they restart with new "
                                  "episodes")
            else:  # unpickling runs code: only this user's own pickles (see worldmodels.signing)
                warnings.warn(f"the saved environments in {logdir} were not signed with this user's key "
                              f"({signing.key_path()}), so they are not unpickled: the envs restart with new "
                              "episodes. If this is your own run (written on another machine or under another "
                              "key), pass --run.trust-env-pickle to restore them.")
        if saved_envs is not None:
            _set_env_state(self.envs, saved_envs)
        else:
            if "envs" not in blobs:
                warnings.warn("environment state was not saved with the checkpoint (not picklable): the "
                              "envs restart with new episodes")
            self.pending = {}
        print(f"resumed from {logdir} at env step {self.counters['env_steps']} ({self.counters['updates']} updates)")

    @property
    def policy_state(self) -> agent_lib.AgentState:
        """The agent state the policy, evaluation and videos use: with many processes, this process's
        own copy of the state (they run on this process alone; see `sharding.local_copy`)."""
        if self.processes == 1:
            return self.state
        if self._policy_state is None:
            self._policy_state = sharding.local_copy(self.state)
        return self._policy_state

    def stop_requested(self, interrupted: bool) -> bool:
        """Ctrl-C: with many processes, all stop at the same step when any of them was interrupted."""
        return sharding.any_process(interrupted) if self.processes > 1 else interrupted

    def _start_compiling_train_step(self) -> None:
        """The train step compiles in a thread while the envs take their first steps (train_start): XLA's
        compile releases the GIL, so the envs and the policy mostly run on the other core meanwhile. It is
        traced and lowered here, under the caller's thread-local JAX settings (e.g. jax.default_device),
        and for the restored state and key when resuming (restored arrays are committed to a device): both
        are part of jit's cache key."""
        rc = self.rc
        self.background = ThreadPoolExecutor(1, thread_name_prefix="compile-train")
        batch_shapes = {k: jax.ShapeDtypeStruct((rc.batch_size, rc.window, *shape), dtype)
                        for k, (shape, dtype) in self.replay.spec.items()}
        self.train_compiled = Future()
        if rc.train_ratio > 0 and rc.steps > max(rc.train_start, self.counters["env_steps"]):
            try:
                self.train_compiled = self.background.submit(
                    agent_lib.lower_train(self.state, batch_shapes, self.key, self.mesh).compile)
            except Exception as e:  # raised at the first update, as a compile error is, so the clean-up runs
                self.train_compiled.set_exception(e)
        else:  # no updates to come
            self.train_compiled.set_result(None)

    def _reset_envs(self) -> None:
        """New episodes in every env: the first run, or a resume without the envs' saved state."""
        n, rc = self.n, self.rc
        obs, _ = self.envs.reset(seed=rc.seed + self.first_env + 7919 * self.counters["env_steps"])
        self.pending = {**spaces.batch_obs(self.obs_space, obs, n), "reward": np.zeros(n, np.float32),
                        "is_first": np.ones(n, bool), "is_last": np.zeros(n, bool), "is_terminal": np.zeros(n, bool),
                        "action": np.zeros((n, self.act_spec.dim), np.float32)}
        self.episode_return[:], self.episode_length[:] = 0.0, 0
        self.carry = self._initial_carry()

    def _initial_carry(self) -> agent_lib.PolicyCarry:
        carry = agent_lib.initial_carry(self.policy_state, self.n)
        if self.split_envs:
            return jax.device_put(carry, sharding.split_batch(self.mesh))
        return sharding.put_committed(carry) if self.mesh is None else carry  # as a restored carry

    # -- the loop's phases -----------------------------------------------------------------

    def budget_spent(self) -> bool:
        return self.counters["env_steps"] >= self.rc.steps

    def collect(self) -> None:
        """Act on the pending step, store it (with the latent the policy inferred), step the envs."""
        rc, n, counters = self.rc, self.n, self.counters
        self.key, k_act = jax.random.split(self.key)
        if self.processes > 1:  # each process's envs their own noise
            k_act = jax.random.fold_in(k_act, self.process)
        obs_in = {k: v for k, v in self.pending.items() if k not in ("action", "reward", "is_last", "is_terminal")}
        if self.split_envs:
            obs_in = sharding.put_split(obs_in, self.mesh)
        action, self.carry = agent_lib.policy(self.policy_state, self.carry, obs_in, k_act)
        latent = agent_lib.replay_latent(self.policy_state, self.carry) if rc.replay_context else {}
        action, latent = jax.device_get((action, latent))  # one wait for both
        self.replay.add({**self.pending, **latent})
        if rc.save_episodes:
            self._record(self.pending)
        done = self.pending["is_last"]
        obs, reward, terminated, truncated, info = self.envs.step(spaces.env_actions(self.act_space, action))
        problem = spaces.output_problem(self.obs_space, obs, reward, n)
        if problem is not None:  # before it reaches replay (parallel envs restart such an env themselves)
            i, name, what = problem
            raise EnvOutputError(f"env {rc.env!r} (env {i} of {n}) returned {what} for {name!r} at env step "
                                 f"{counters['env_steps'] + n}; fix or wrap the env, or run it with "
                                 "--run.parallel-envs, which restarts an env that does this")
        # envs that had finished were reset by this step (NEXT_STEP autoreset); a restarted env
        # process also starts a new episode here, and its unfinished one is dropped (not scored)
        first = done | np.asarray(info.get("restarted", np.zeros(n, bool)), bool)
        is_last = (terminated | truncated) & ~first
        self.pending = {**spaces.batch_obs(self.obs_space, obs, n), "reward": np.asarray(reward, np.float32),
                        "is_first": first, "is_last": is_last, "is_terminal": terminated & ~first,
                        "action": np.where(first[:, None], 0.0, action).astype(np.float32)}
        self.episode_return = np.where(first, 0.0, self.episode_return + self.pending["reward"])
        self.episode_length = np.where(first, 0, self.episode_length + 1)
        counters["env_steps"] += n * self.processes
        for i in np.flatnonzero(is_last):
            counters["episodes"] += 1
            self.recent.add(counters["env_steps"], float(self.episode_return[i]))
            self.logger.score(counters["env_steps"], "train", self.episode_return[i], self.episode_length[i])

    def _record(self, step: dict[str, np.ndarray]) -> None:
        """--run.save-episodes: keep each env's stored steps; an episode that ends becomes
        `episodes/<env step>-<env>.npz` (worldmodels.offline). An episode this process did not see
        start (one under way at a resume, or dropped by an env restart) is not written."""
        for i in range(self.n):
            if step["is_first"][i]:
                self.recording[i] = []
            if self.recording[i] is None:
                continue
            self.recording[i].append({k: v[i] for k, v in step.items()})
            if step["is_last"][i]:
                steps = self.recording[i]
                episode = {k: np.stack([s[k] for s in steps]) for k in steps[0]}
                offline.save_episode(self.logdir / "episodes" / f"{self.counters['env_steps']:010d}-"
                                     f"{self.first_env + i}.npz", episode)
                self.recording[i] = None

    def train(self) -> None:
        """The updates owed: train_ratio replayed steps per env step, from train_start on."""
        rc, counters = self.rc, self.counters
        if counters["env_steps"] < rc.train_start or not self.replay.can_sample(rc.window):
            return
        counters["train_credit"] += self.n * self.processes * rc.train_ratio / (rc.batch_size * rc.seq_len)
        if counters["train_credit"] >= 1.0:
            self.train_compiled.result()  # re-raises what went wrong in the compile, if anything
        while counters["train_credit"] >= 1.0:
            # many processes: each samples its rows of the global batch from its own replay shard
            batch, windows = self.replay.sample_windows(rc.batch_size // self.processes, rc.window, self.rng)
            self.key, k_train = jax.random.split(self.key)
            if self.processes > 1:
                self.state, metrics, latents = agent_lib.train(
                    self.state, sharding.put_global_batch(batch, self.mesh),
                    sharding.put_replicated(k_train, self.mesh), self.mesh)
                # now, in every process: gathering an fsdp-split state is a collective
                self._policy_state = sharding.local_copy(self.state)
            else:
                self.state, metrics, latents = agent_lib.train(self.state, batch, k_train, self.mesh)
            if rc.replay_context:  # the trained steps' new posteriors replace the stored ones
                latents = sharding.local_rows(latents, self.mesh) if self.processes > 1 else jax.device_get(latents)
                self.replay.update(windows, latents, offset=1)
            if self.first_update_seconds is None:
                jax.block_until_ready(metrics)
                self.first_update_seconds = time.perf_counter() - self.run_start
            self.pending_metrics.append(metrics)
            self.unchecked.append(metrics)
            counters["updates"] += 1
            counters["train_credit"] -= 1.0
            if rc.max_skipped_updates and len(self.unchecked) >= rc.max_skipped_updates:
                self._check_skipped(batch)  # one host sync per max_skipped_updates updates

    def log_evaluate_checkpoint(self) -> None:
        """Whatever of logging, greedy evaluation and checkpointing is due at this step."""
        rc, counters = self.rc, self.counters
        steps = counters["env_steps"]
        if steps - counters["last_log"] >= rc.log_every:
            counters["last_log"] = steps
            self._log_metrics(steps)
        if rc.video_every and self.main and steps - counters.get("last_video", 0) >= rc.video_every:
            counters["last_video"] = steps
            self._open_loop_video(steps)
        if self.eval_env is not None and steps - counters["last_eval"] >= rc.eval_every:
            counters["last_eval"] = steps
            # a key of its own (not split from the loop's), so evaluating never changes training
            k_eval = jax.random.fold_in(jax.random.PRNGKey(rc.seed + 2), steps)
            recording = {} if rc.eval_video else None
            for ret, length in evaluate(self.policy_state, self.eval_env, rc.eval_episodes, k_eval, recording=recording,
                                        record_steps=VIDEO_LENGTH):
                self.logger.score(steps, "eval", ret, length)
            self._eval_video(steps, recording)
        if rc.checkpoint_every and steps - counters["last_checkpoint"] >= rc.checkpoint_every:
            self.checkpoint()
        if self.progress is not None:
            self.progress.update(self.n)

    def final_evaluation(self) -> None:
        """Greedy episodes when this call brought the run to its budget (not when it stopped early)."""
        rc, steps = self.rc, self.counters["env_steps"]
        if not (steps >= rc.steps > self.start_steps and rc.final_eval_episodes > 0 and self.main):
            return
        if self.progress is not None:
            self.progress.close()
        if self.eval_env is None:
            self.eval_env = self.env_fn(rc.seed + 100_000)
        key_eval = jax.random.fold_in(jax.random.PRNGKey(rc.seed + 3), steps)
        recording = {} if rc.eval_video else None
        results = evaluate(self.policy_state, self.eval_env, rc.final_eval_episodes, key_eval, recording=recording,
                           record_steps=VIDEO_LENGTH)
        self.final_eval = final_evaluation_report(self.logger, steps, *zip(*results), self.recent)
        self._eval_video(steps, recording)

    def _open_loop_video(self, steps: int) -> None:
        """Open-loop predictions of 4 replayed sequences (agent.open_loop_video), from a generator and a key
        of their own, so that videos never change training."""
        length = min(VIDEO_LENGTH, self.rc.window)
        if not self.replay.can_sample(length):
            return
        batch = self.replay.sample(4, length, np.random.default_rng([self.rc.seed, steps]))
        key = jax.random.fold_in(jax.random.PRNGKey(self.rc.seed + 4), steps)
        for name, frames in jax.device_get(agent_lib.open_loop_video(self.policy_state, batch, key,
                                                                     VIDEO_CONTEXT)).items():
            self.logger.video(steps, f"open_loop/{name}", frames)

    def _eval_video(self, steps: int, recording: dict | None) -> None:
        """The same video of the first evaluation episode's first steps (with the actions it took)."""
        if not recording or recording["is_first"].shape[1] <= VIDEO_CONTEXT:
            return
        key = jax.random.fold_in(jax.random.PRNGKey(self.rc.seed + 5), steps)
        for name, frames in jax.device_get(agent_lib.open_loop_video(self.policy_state, recording, key,
                                                                     VIDEO_CONTEXT)).items():
            self.logger.video(steps, f"eval_open_loop/{name}", frames)

    def checkpoint(self, wait: bool = False) -> None:
        rc, counters = self.rc, self.counters
        blobs, envs_signature = {}, None
        if not rc.parallel_envs:
            try:
                blobs["envs"] = pickle.dumps(_env_state(self.envs))
                envs_signature = signing.sign(blobs["envs"])
            except Exception as e:  # MuJoCo handles and similar: resume will restart episodes
                warnings.warn(f"could not pickle the environments ({e}); a resume restarts their episodes")
        replay_state = {**self.replay.state_dict(), **{f"pending/{k}": v for k, v in self.pending.items()},
                        "loop/episode_return": self.episode_return, "loop/episode_length": self.episode_length}
        meta = {"counters": counters, "rng": self.rng.bit_generator.state, "recent_returns": self.recent.state(),
                "replay_stored": self.replay.stored_per_env,
                "pending_keys": {k: [list(v.shape), str(v.dtype)] for k, v in self.pending.items()},
                "config": to_dict(self.config), "envs_signature": envs_signature, "processes": self.processes}
        step = counters["env_steps"]
        # set before the save, so that the checkpoint holds it (a resumed run does not save again at once),
        # and after a full disk the next try comes at the next interval
        counters["last_checkpoint"] = step
        agent_state = {"agent": self.state, "carry": self.carry, "key": self.key}
        if self.processes > 1:  # the agent once, from process 0, as numpy (see __init__)
            agent_state = jax.device_get({"agent": self.policy_state, "carry": self.carry, "key": self.key} if self.main
                                         else {"carry": self.carry, "key": self.key})
        if save_or_warn(lambda: self.ckpt.save(step, agent_state, replay_state, meta, blobs, wait=wait), step,
                        self.ckpt):
            self.saved.append(step)

    def close(self, clean_exit: bool) -> None:
        """Only a loop that stopped at a step boundary is consistent enough to save; after a crash the
        previous checkpoint stays the one to resume from."""
        try:
            counters = self.counters
            if clean_exit and self.pending_metrics:  # the updates since the last log (the log schedule stays)
                self._log_metrics(counters["env_steps"])
            if clean_exit and (counters["last_checkpoint"] != counters["env_steps"]
                               or not (self.saved or self.ckpt.all_steps())):
                self.checkpoint(wait=True)
        finally:
            self.ckpt.close()
            self.logger.close()
            if self.progress is not None:
                self.progress.close()
            self.envs.close()
            if self.eval_env is not None:
                self.eval_env.close()
            # A thread cannot be stopped inside XLA, and exiting under it aborts the process: let it finish.
            if not self.train_compiled.done():
                print("waiting for the train step to finish compiling before exiting")
            self.background.shutdown(wait=True)

    def summary(self) -> dict[str, Any]:
        counters, recent = self.counters, self.recent
        return {"env_steps": counters["env_steps"], "updates": counters["updates"], "episodes": counters["episodes"],
                "recent_return": recent.mean(counters["env_steps"]),
                "recent_episodes": len(recent.returns(counters["env_steps"])), "recent_window_steps": recent.window,
                **self.final_eval, "seconds": time.time() - self.start_time,
                "first_update_seconds": self.first_update_seconds, "state": self.state}

    # -- helpers -----------------------------------------------------------------------------

    def _check_skipped(self, batch: dict[str, np.ndarray]) -> None:
        """Stop the run after `run.max_skipped_updates` updates in a row that the non-finite guard
        skipped, writing the last one's batch to the run dir (the last checkpoint stays resumable)."""
        rc, counters, unchecked = self.rc, self.counters, self.unchecked
        flags, last = jax.device_get(([m["train/skipped"] for m in unchecked], unchecked[-1]))  # one transfer
        self.skipped_in_a_row = skipped_in_a_row(self.skipped_in_a_row, flags)
        unchecked.clear()
        if self.skipped_in_a_row < rc.max_skipped_updates:
            return
        path = self.logdir / f"nonfinite_batch_update{counters['updates']}.npz"
        np.savez_compressed(path, **batch)
        raise nonfinite_updates_error(self.skipped_in_a_row, f"at env step {counters['env_steps']} (update "
                                      f"{counters['updates']})", last, f"Its batch is in {path}.",
                                      self.ckpt.all_steps())

    def _log_metrics(self, steps: int) -> None:
        counters = self.counters
        elapsed = max(time.time() - self.start_time, 1e-9)
        values = {"env_steps_per_s": (steps - self.start_steps) / elapsed,
                  "updates_per_s": (counters["updates"] - self.start_updates) / elapsed,
                  "updates": counters["updates"], "episodes": counters["episodes"]}
        recent_returns = self.recent.returns(steps)
        if recent_returns:
            values["train/return_recent"] = float(np.mean(recent_returns))
            values["train/return_recent_episodes"] = len(recent_returns)
        if self.pending_metrics:
            stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *self.pending_metrics))
            values.update({k: float(np.mean(v)) for k, v in stacked.items()})
            values["train/skipped_updates"] = int(np.sum(stacked["train/skipped"]))
            self.pending_metrics = []
        self.logger.metrics(steps, values)
        if self.progress is not None:
            self.progress.set_postfix({"env/s": f"{values['env_steps_per_s']:.0f}",
                                       "upd/s": f"{values['updates_per_s']:.2f}",
                                       "return": f"{values.get('train/return_recent', float('nan')):.1f} "
                                                 f"({len(recent_returns)} ep)"})


from worldmodels.device_loop import run_on_device  # noqa: E402,F401  (the device loop for JAX envs)
