"""Train a DreamerV3-style agent: `python -m experiments.train [--preset NAME ...] [--env NAME] [--run.x V ...]`.

Presets apply in order on top of the defaults, then explicit options override them. The resolved
config is printed and saved as `<logdir>/config.json`; starting again in the same logdir resumes.
Examples:
    python -m experiments.train --preset size1m cartpole          # the default run: 5-8 minutes on 2 CPU cores
    python -m experiments.train --env bsuite/catch/0 --preset catch
    python -m experiments.train --env gym:Pendulum-v1 --run.steps 50000 --run.logdir runs/pendulum
    python -m experiments.train --env bsuite/catch/0 --preset catch --device-loop   # JAX env, one compiled loop
    python -m experiments.train --env mjx/cartpole-swingup --device-loop --run.num-envs 16   # DMC on MJX
    python -m experiments.train --env mjx-vision/cartpole-swingup --device-loop --run.num-envs 16  # its images
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import dataclasses
import difflib
import functools
import math
import os
import sys

# Hide the accelerator probe warnings on CPU-only machines. (`envs` picks MuJoCo's renderer itself.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402
import tyro  # noqa: E402

import envs  # noqa: E402
from envs.parallel import ParallelVectorEnv  # noqa: E402
from experiments.presets import register as register_presets  # noqa: E402
from worldmodels import loop, sharding  # noqa: E402
from worldmodels.sequence import MODELS  # noqa: E402
from worldmodels.device_loop import check_options as check_device_loop_options  # noqa: E402
from worldmodels.config import PRESETS, Config, ConfigError, dumps, make_config, override, validate  # noqa: E402


def parse(argv: list[str] | None = None) -> Config:
    return _parse(argv)[0]


def _parse(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The config and whether --device-loop was given."""
    register_presets()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", nargs="+", default=[])
    pre.add_argument("--env", default=None)
    pre.add_argument("--model", default=None)
    pre.add_argument("--device-loop", action="store_true")
    known, rest = pre.parse_known_args(argv)
    unknown = [p for p in known.preset if p not in PRESETS]
    if unknown:
        raise SystemExit(f"error: unknown preset(s) {', '.join(map(repr, unknown))}; valid presets: "
                         f"{', '.join(sorted(PRESETS))}")
    if known.model is not None and known.model not in MODELS:
        close = difflib.get_close_matches(known.model, MODELS, n=1)
        raise SystemExit(f"error: --model {known.model!r}: unknown sequence model"
                         f"{f' (did you mean {close[0]!r}?)' if close else ''}; valid: {', '.join(MODELS)}")
    base = make_config(known.preset)
    if known.env is not None:
        base = override(base, "run.env", known.env)
    if known.model is not None:
        base = override(base, "agent.world_model.sequence.model", known.model)
    sequence = base.agent.world_model.sequence
    if base.run.replay_context and not sequence.selected.keeps_replay_context:
        base = override(base, "run.replay_context", False)
        print(f"note: --model {sequence.model}: replay context off (--run.no-replay-context); each replayed window "
              "starts from the initial state", file=sys.stderr)
    description = (f"{__doc__}\nPresets (--preset NAME [NAME ...]): {', '.join(sorted(PRESETS))}.\n"
                   f"--env NAME is short for --run.env NAME; --model {'|'.join(MODELS)} for "
                   "--agent.world_model.sequence.model.\n--device-loop: run a JAX-native env (a bsuite twin "
                   "or mjx/<domain>-<task>, mjx-vision/ for images, envs.jax) in worldmodels.device_loop (env, policy, replay and training in one "
                   "compiled lax.scan chunk).\n\nbsuite ids are bsuite/<experiment>/<number>, the keys of "
                   "bsuite.sweep.SETTINGS: e.g. 'bsuite/memory_len/15' is memory length 30 (an unknown id "
                   f"lists what each id of its experiment means).\n\n{SMOKE_STEPS}=N in the environment "
                   "caps a run at N env steps (a smoke test of a command).")
    return tyro.cli(Config, default=base, args=rest, description=description), known.device_loop


# A smoke run of a command as written (the README test uses it): at most this many env steps, and
# updates only at its end, so that every command trains, logs and checkpoints but stays short.
SMOKE_STEPS = "WORLDMODELS_SMOKE_STEPS"
SMOKE_UPDATES = 1  # updates a smoke run makes (where its replay holds a whole window by then)


def apply_smoke_steps(config: Config) -> Config:
    """`config` with `run.steps` capped at $WORLDMODELS_SMOKE_STEPS (unset or empty: unchanged),
    `run.train_start` moved so that about `SMOKE_UPDATES` updates come last, and the log, eval and
    checkpoint intervals within the run."""
    value = os.environ.get(SMOKE_STEPS, "")
    if not value:
        return config
    if not value.isdigit() or int(value) < 2:
        raise SystemExit(f"error: {SMOKE_STEPS}={value!r}: give a number of env steps >= 2 (e.g. 320), "
                         "or unset it")
    rc = config.run
    steps = min(rc.steps, int(value))
    env_steps_per_update = rc.batch_size * rc.seq_len / rc.train_ratio if rc.train_ratio > 0 else steps
    train_start = max(0, min(rc.train_start, steps - math.ceil(SMOKE_UPDATES * env_steps_per_update)))
    within = lambda every: min(every, max(steps // 2, 1)) if every else every  # 0 keeps "never"
    run = dataclasses.replace(rc, steps=steps, train_start=train_start, log_every=within(rc.log_every),
                              eval_every=within(rc.eval_every), checkpoint_every=within(rc.checkpoint_every))
    print(f"{SMOKE_STEPS}={value}: a smoke run of {steps} env steps, updates from step {train_start}")
    return dataclasses.replace(config, run=run)


def enable_compile_cache(path: str | None = None) -> None:
    """Keep compiled programs on disk in `path` (None: WORLDMODELS_COMPILE_CACHE, default
    ~/.cache/worldmodels/xla; an empty string switches the cache off): a resumed or repeated run
    skips most compiling."""
    if path is None:
        path = os.environ.get("WORLDMODELS_COMPILE_CACHE", os.path.expanduser("~/.cache/worldmodels/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> dict:
    config, device_loop = _parse(argv)
    if not config.run.coordinator:
        # Not with many processes: on jax 0.12.1 two processes that resumed with their programs in the
        # cache hung in their first collective (jax 0.10.2 was fine).
        enable_compile_cache()
    try:  # before the config is printed and anything compiles
        envs.check_name(config.run.env)
    except ValueError as e:
        raise SystemExit(f"error: --env: {e}") from None
    config = apply_smoke_steps(config)
    try:
        validate(config)
        if device_loop:
            check_device_loop_options(config)
        # many processes: join them before anything touches a device
        sharding.initialize_distributed(config.run.coordinator, config.run.num_processes, config.run.process_id,
                                        config.run.coordinator_timeout)
        # the devices that each batch (the host loop) or the env batch (the device loop) splits over
        mesh = sharding.make_mesh(config.run.mesh)
        if sharding.data_size(mesh) > 1:
            if device_loop:
                sharding.check_batch("--run.num-envs", config.run.num_envs, mesh)
            else:
                sharding.check_batch("--run.batch-size", config.run.batch_size, mesh)
    except (ConfigError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    if device_loop:
        import envs.jax as jenvs

        if config.run.env.startswith(("dmc/", "dmc-vision/")):
            family, task = config.run.env.split("/", 1)
            twin = {"dmc": "mjx", "dmc-vision": "mjx-vision"}[family]
            raise SystemExit(f"error: --device-loop needs a JAX-native env, and {family}/ is dm_control's, stepped on "
                             f"the host: use {twin}/{task} (MuJoCo Playground's port on MJX) in the device loop, or "
                             f"drop --device-loop to train on {config.run.env} in the host loop")
        if not config.run.env.startswith(("bsuite/", "mjx/", "mjx-vision/", "tmaze/")):
            raise SystemExit(f"error: --device-loop needs a JAX-native env: bsuite/<id> of "
                             f"{', '.join(jenvs.experiments())}, mjx/<domain>-<task> (DMC on MJX; mjx-vision/ for "
                             f"images) or tmaze/<L>; {config.run.env!r} has no JAX-native version: drop --device-loop "
                             "to use the host loop")
        try:
            env, env_params = jenvs.make(config.run.env)
        except (ValueError, ModuleNotFoundError) as e:
            raise SystemExit(f"error: --device-loop: {e}") from None
    print(dumps(config))
    if device_loop:
        summary = loop.run_on_device(config, env, env_params)
        summary.pop("state", None), summary.pop("replay", None)
        print("summary:", summary)
        return summary
    # A partial of envs.make, not a closure over the config: env processes unpickle it.
    env_fn = functools.partial(envs.make, config.run.env)
    summary = loop.run(config, env_fn, parallel_vector_env=ParallelVectorEnv)
    summary.pop("state", None)
    print("summary:", summary)
    return summary


if __name__ == "__main__":
    main()
