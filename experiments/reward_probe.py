"""World-model-only training on random-policy data of a JAX bsuite env: can the model predict the reward?

A diagnostic (not a test) for memory tasks. The actor is never trained, so the data are uniform
random play; the world model trains on replayed `[B, T]` windows with the agent's own optimiser
settings. Every `--every` updates it prints the world-model losses and, on fresh held-out windows,
the reward prediction at the steps with a nonzero reward: the fraction whose predicted sign is right
(0.5 is chance for memory_len's +-1) and the mean absolute error. Only rewarding steps whose
episode starts inside the window count, since the model cannot know an earlier context.

    python -m experiments.reward_probe --env memory_len/9 --preset r2i-bsuite-cpu --updates 2000
    python -m experiments.reward_probe --env memory_len/2 --preset dreamer-bsuite-cpu --set agent.optim.lr=1e-3
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import ast
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import envs.jax as jenvs
from experiments.presets import register as register_presets
from worldmodels.config import make_config
from worldmodels.device_loop import DeviceLoop
from worldmodels.optim import make_optimizer
from worldmodels.replay import replay_sample


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def reward_accuracy(wm, batch, key) -> tuple[float, float, int]:
    """(sign accuracy, mean abs error, count) of the predicted reward at rewarding steps whose episode
    started inside the window."""
    b = batch["is_first"].shape[0]
    _, (post, _) = wm.loss(batch, wm.dynamics.initial(b), key)
    pred = wm.reward(wm.dynamics.features(post)).mean()
    seen_start = jnp.cumsum(batch["is_first"], 1) > 0  # this step's episode began inside the window
    # (step 0 is a window start even when not is_first: its context came before the window)
    seen_start = seen_start & ~((jnp.arange(batch["is_first"].shape[1]) == 0) & ~batch["is_first"])
    mask = (batch["reward"] != 0) & seen_start
    correct = (jnp.sign(pred) == jnp.sign(batch["reward"])) & mask
    count = mask.sum()
    return (float(correct.sum() / jnp.maximum(count, 1)),
            float((jnp.abs(pred - batch["reward"]) * mask).sum() / jnp.maximum(count, 1)), int(count))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="memory_len/9", help="a bsuite id with a JAX version (envs.jax)")
    parser.add_argument("--preset", nargs="+", default=["r2i-bsuite-cpu"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--data-steps", type=int, default=20_000, help="random-policy env steps collected")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    register_presets()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = make_config(args.preset, {"run.num_envs": 16, "run.train_ratio": 0.0,
                                       "run.replay_capacity": args.data_steps,
                                       **{k: _value(v) for k, v in overrides.items()}})
    rc = config.run
    env, params = jenvs.make(args.env)
    loop = DeviceLoop(config, env, params, chunk_env_steps=args.data_steps)
    carry, _ = loop.chunk(loop.init(jax.random.PRNGKey(args.seed), params), params)  # random play
    replay = carry.replay
    print(f"{args.env}: {int(replay.written) * rc.num_envs} random-policy steps; model "
          f"{config.agent.world_model.sequence.model}; batch {rc.batch_size} x {rc.seq_len}; "
          f"lr {config.agent.optim.lr:g}")

    wm = carry.agent.world_model
    optimizer = make_optimizer(config.agent.optim)
    opt_state = optimizer.init(eqx.filter(wm, eqx.is_array))

    @eqx.filter_jit
    def update(wm, opt_state, key):
        k_sample, k_loss = jax.random.split(key)
        batch = replay_sample(replay, rc.batch_size, rc.seq_len, k_sample)
        loss_fn = lambda m: m.loss(batch, m.dynamics.initial(rc.batch_size), k_loss)
        (loss, (_, metrics)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(wm)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(wm, eqx.is_array))
        return eqx.apply_updates(wm, updates), opt_state, metrics

    key = jax.random.PRNGKey(args.seed + 1)
    start = time.time()
    print(f"{'update':>7}{'reward':>9}{'cont':>9}{'rec':>9}{'dyn':>9}{'sign acc':>10}{'abs err':>9}{'n':>6}{'s':>7}")
    for i in range(1, args.updates + 1):
        key, k = jax.random.split(key)
        wm, opt_state, metrics = update(wm, opt_state, k)
        if i % args.every == 0 or i == args.updates:
            key, k_batch, k_probe = jax.random.split(key, 3)
            batch = replay_sample(replay, 64, rc.seq_len, k_batch)
            acc, err, n = reward_accuracy(wm, batch, k_probe)
            m = jax.device_get(metrics)
            rec = sum(float(v) for k, v in m.items() if k.startswith("loss/rec_"))
            print(f"{i:>7}{float(m['loss/reward']):>9.4f}{float(m['loss/cont']):>9.4f}{rec:>9.4f}"
                  f"{float(m['loss/dyn']):>9.4f}{acc:>10.3f}{err:>9.3f}{n:>6}{time.time() - start:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
