"""Bad input, one table: each malformed option or config is refused before anything is built or
compiled, with one line that names the option (or what is wrong) and a valid value."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from experiments import train as train_cli
from worldmodels import agent as agent_lib
from worldmodels import loop, spaces
from worldmodels.config import ConfigError, make_config

# (CLI arguments, what the one-line error must contain)
CLI_CASES = [
    (["--run.steps", "0"], "--run.steps 0: must be >= 1"),
    (["--run.steps", "-5"], "--run.steps -5: must be >= 1"),
    (["--run.batch-size", "0"], "--run.batch-size 0: must be >= 1 (e.g. --run.batch-size 16)"),
    (["--run.seq-len", "0"], "--run.seq-len 0: must be >= 1 (e.g. --run.seq-len 64)"),
    (["--run.num-envs", "0"], "--run.num-envs 0: must be >= 1"),
    (["--run.replay-capacity", "0"], "--run.replay-capacity 0: must be >= 1"),
    (["--run.seq-len", "200", "--run.replay-capacity", "100"],
     "--run.replay-capacity 100: holds 100 steps per env (--run.num-envs 1), fewer than one sampled window of 201"),
    (["--run.num-envs", "4", "--run.replay-capacity", "200"], "give at least 260"),
    (["--run.train-ratio", "-1"], "--run.train-ratio -1.0: must be >= 0"),
    (["--run.train-start", "-1"], "--run.train-start -1: must be >= 0"),
    (["--run.log-every", "0"], "--run.log-every 0: must be >= 1"),
    (["--run.eval-every", "-1"], "--run.eval-every -1: must be >= 0"),
    (["--run.eval-every", "100", "--run.eval-episodes", "0"], "--run.eval-episodes 0: must be >= 1 when --run.eval-every"),
    (["--run.checkpoint-every", "-10"], "--run.checkpoint-every -10: must be >= 0"),
    (["--run.final-eval-episodes", "-1"], "--run.final-eval-episodes -1: must be >= 0"),
    (["--agent.optim.lr", "0"], "--agent.optim.lr 0.0: must be > 0 (e.g. --agent.optim.lr 4e-05)"),
    (["--agent.optim.lr", "-1e-4"], "--agent.optim.lr -0.0001: must be > 0"),
    (["--agent.optim.warmup", "-1"], "--agent.optim.warmup -1: must be >= 0"),
    (["--agent.optim.actor-lr", "0"], "--agent.optim.actor-lr 0.0: must be > 0"),
    (["--agent.optim.beta2", "2"], "--agent.optim.beta2 2.0: must be in [0, 1]"),
    (["--agent.actor-critic.lam", "1.5"], "--agent.actor-critic.lam 1.5: must be in [0, 1] (e.g. --agent.actor-critic.lam 0.95)"),
    (["--agent.actor-critic.discount-horizon", "1"], "--agent.actor-critic.discount-horizon 1.0: must be > 1"),
    (["--agent.actor-critic.horizon", "0"], "--agent.actor-critic.horizon 0: must be >= 1"),
    (["--agent.actor-critic.entropy", "-0.1"], "--agent.actor-critic.entropy -0.1: must be >= 0"),
    (["--agent.actor-critic.retnorm-low", "95", "--agent.actor-critic.retnorm-high", "5"], "0 <= low < high <= 100"),
    (["--agent.world-model.sequence.rssm.deter", "100"], "must be a multiple of --agent.world-model.sequence.rssm.blocks 8"),
    (["--agent.world-model.sequence.rssm.classes", "1"], "--agent.world-model.sequence.rssm.classes 1: must be >= 2"),
    (["--agent.world-model.bins", "254"], "--agent.world-model.bins 254: must be odd"),
    (["--agent.world-model.units", "0"], "--agent.world-model.units 0: must be >= 1"),
    (["--model", "s3m", "--agent.world-model.sequence.s3m.state-size", "0"],
     "--agent.world-model.sequence.s3m.state-size 0: must be >= 1"),
    (["--model", "lstm"], "--model 'lstm': unknown sequence model; valid: rssm, s3m, ffm, transformer"),
    (["--model", "transfomer"], "(did you mean 'transformer'?)"),
    (["--model", "ffm", "--agent.world-model.sequence.ffm.contexts", "0"],
     "--agent.world-model.sequence.ffm.contexts 0: must be >= 1"),
    (["--model", "ffm", "--agent.world-model.sequence.ffm.memory", "0"],
     "--agent.world-model.sequence.ffm.memory 0: must be >= 1"),
    (["--model", "transformer", "--agent.world-model.sequence.transformer.window", "0"],
     "--agent.world-model.sequence.transformer.window 0: must be >= 1"),
    (["--model", "transformer", "--agent.world-model.sequence.transformer.window", "65"],
     "--agent.world-model.sequence.transformer.window 65: larger than the replayed window it learns from "
     "(--run.seq-len 64)"),
    (["--model", "transformer", "--agent.world-model.sequence.transformer.heads", "3"],
     "must split into --agent.world-model.sequence.transformer.heads 3 heads of even size"),
    (["--model", "transformer", "--run.replay-context"], "--run.replay-context with --model transformer"),
    # a preset and an option that contradict: debug's 10k-step replay cannot hold a 20k-step window
    (["--preset", "debug", "--run.seq-len", "20000"], "--run.replay-capacity 10000: holds 10000 steps per env"),
    (["--env", "atari/Pong"], "--env: unknown environment family in 'atari/Pong'"),
    (["--env", "bsuite/memory_len/30"], "memory_length 30 is 'bsuite/memory_len/15'"),
    (["--env", "bsuite/memory_length/3"], "unknown bsuite experiment 'memory_length'"),
    (["--env", "gym:"], "has no id after 'gym:'"),
    (["--preset", "size9m"], "unknown preset(s) 'size9m'; valid presets:"),
    (["--device-loop", "--env", "gym:CartPole-v1"], "--device-loop needs a JAX-native env: bsuite/<id>"),
    (["--device-loop", "--env", "bsuite/catch/0", "--run.save-episodes"],
     "--run.save-episodes: options of the host loop only"),
    (["--run.video-every", "100", "--run.seq-len", "4"], "--run.video-every 100: a video observes 5 replayed steps"),
    (["--run.mesh", "model=2"],
     "--run.mesh 'model=2': must be 'data' (every visible device), 'data=N' (the first N) or 'data=N,fsdp=M'"),
    (["--device-loop", "--env", "bsuite/catch/0", "--run.coordinator", "127.0.0.1:1234"],
     "--run.coordinator: the device loop runs in one process"),
    (["--run.mesh", "data=2"], "run.mesh 'data=2' asks for 2 devices; 1 are visible"),  # this process: 1 CPU device
]


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_refuses_bad_options_in_one_line_before_anything_runs(argv, message, capsys):
    traces = dict(agent_lib.TRACE_COUNTS)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "\n" not in error, error
    assert message in error
    assert capsys.readouterr().out == ""  # the config was not printed: nothing was built
    assert dict(agent_lib.TRACE_COUNTS) == traces


# Wrong types: the CLI parser (tyro, argparse) refuses them and names the option.
TYPE_CASES = [
    (["--run.steps", "abc"], "--run.steps"),
    (["--agent.compute-dtype", "float16"], "--agent.compute-dtype"),
    (["--agent.optim.lr", "fast"], "--agent.optim.lr"),
]


@pytest.mark.parametrize("argv, option", TYPE_CASES, ids=[" ".join(a) for a, _ in TYPE_CASES])
def test_cli_refuses_wrong_types_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_smoke_steps_variable_must_be_a_number(monkeypatch):
    monkeypatch.setenv("WORLDMODELS_SMOKE_STEPS", "abc")
    with pytest.raises(SystemExit, match="WORLDMODELS_SMOKE_STEPS='abc': give a number of env steps"):
        train_cli.main([])


def test_library_use_is_refused_before_the_env_is_built(tmp_path):
    config = make_config(["debug"], {"run.logdir": str(tmp_path), "run.batch_size": 0})
    built = []
    with pytest.raises(ConfigError, match="--run.batch-size 0: must be >= 1"):
        loop.run(config, lambda seed: built.append(seed))
    assert built == [] and not (tmp_path / "config.json").exists()
    # a value of the wrong type, set from Python
    with pytest.raises(ConfigError, match="--run.steps '100': must be an integer"):
        loop.run(make_config(["debug"], {"run.steps": "100"}), lambda seed: built.append(seed))
    with pytest.raises(ConfigError, match="--agent.world-model.norm 'batch': must be one of 'rms', 'layer', 'none'"):
        loop.run(make_config(["debug"], {"agent.world_model.norm": "batch"}), lambda seed: built.append(seed))


def test_spaces_the_agent_cannot_use_are_named():
    with pytest.raises(TypeError, match="image observation 'observation' is 60x60: the CNN needs a square side "
                                        "that is a power of two"):
        spaces.obs_spec(gym.spaces.Box(0, 255, (60, 60, 3), np.uint8))
    with pytest.raises(TypeError, match="'pixels' is 64x32"):
        spaces.obs_spec(gym.spaces.Dict({"pixels": gym.spaces.Box(0, 255, (64, 32, 3), np.uint8)}))
    with pytest.raises(TypeError, match="needs finite bounds"):
        spaces.action_spec(gym.spaces.Box(-np.inf, np.inf, (2,), np.float32))
    with pytest.raises(TypeError, match="unsupported action space"):
        spaces.action_spec(gym.spaces.MultiDiscrete([2, 3]))


def test_every_preset_is_valid():
    from experiments.presets import register
    from worldmodels.config import PRESETS, validate

    register()
    for name in PRESETS:
        validate(make_config([name]))
