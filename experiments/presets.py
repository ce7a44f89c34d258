"""Per-benchmark run presets, added to `worldmodels.config.PRESETS` (the library's own presets are
the model sizes and `debug`)."""

from __future__ import annotations

from worldmodels.config import PRESETS

RUN_PRESETS = {
    # The README's default run: CartPole-v1 with the size1m model, about 10 minutes on 2 CPU cores.
    "cartpole": {"run.env": "gym:CartPole-v1", "run.steps": 12_000, "run.train_ratio": 64.0,
                 "run.batch_size": 16, "run.seq_len": 64, "run.log_every": 1000},
    # bsuite catch: 9-step episodes; the learning benchmark's setting.
    "catch": {"run.env": "bsuite/catch/0", "run.steps": 20_000, "run.train_ratio": 64.0, "run.log_every": 1000},
}


def register() -> None:
    for name, overrides in RUN_PRESETS.items():
        PRESETS.setdefault(name, overrides)
