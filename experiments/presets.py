"""Per-benchmark run presets, added to `worldmodels.config.PRESETS` (the library's own presets are
the model sizes and `debug`)."""

from __future__ import annotations

from worldmodels.config import PRESETS

# Short CPU runs: a higher learning rate and a short warmup than DreamerV3's 4e-5 / 1000 updates,
# which are tuned for runs of 10^5+ updates; these runs make only a few thousand.
FAST_LEARNING = {"agent.optim.lr": 2e-4, "agent.optim.warmup": 100}

RUN_PRESETS = {
    # The README's default run: CartPole-v1 with the size1m model, about 10 minutes on 2 CPU cores.
    "cartpole": {"run.env": "gym:CartPole-v1", "run.steps": 12_000, "run.train_ratio": 64.0,
                 "run.batch_size": 16, "run.seq_len": 64, "run.log_every": 1000, **FAST_LEARNING},
    # bsuite catch: 9-step episodes; the learning benchmark's setting.
    "catch": {"run.env": "bsuite/catch/0", "run.steps": 20_000, "run.train_ratio": 64.0, "run.log_every": 1000,
              **FAST_LEARNING},
}


def register() -> None:
    for name, overrides in RUN_PRESETS.items():
        PRESETS.setdefault(name, overrides)
