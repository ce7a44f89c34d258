"""Env speed per family (not a test): one env in this process, random actions vs the agent's policy.

    python -m experiments.env_speed                          # the default table
    python -m experiments.env_speed --envs memory_maze/9x9 --seconds 20
    python -m experiments.env_speed --preset size1m          # a bigger policy in the loop

Per env: build time, first reset time, env steps/s with random actions (`action_space.sample`) and
with the agent's policy in the loop (observation conversion + one jitted `agent.policy` call per
step on the host, as `worldmodels.loop` acts), and the median policy call in ms. Steps/s include
the resets of episodes that end inside the measured time. The policy is compiled before timing.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import gymnasium  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from worldmodels import agent as agent_lib  # noqa: E402
from worldmodels import spaces  # noqa: E402
from worldmodels.config import make_config  # noqa: E402

DEFAULT_ENVS = (
    "dmc/cartpole-balance",
    "dmc/walker-walk",
    "dmc-vision/cartpole-swingup",
    "dmc-vision/walker-walk",
    "memory_maze/9x9",
    "bsuite/memory_len/10",
    "popgym/RepeatPreviousEasy",
    "gym:CartPole-v1",
)

def _timed_steps(env: gymnasium.Env, act: Callable[[object, bool], object], seconds: float,
                 max_steps: int) -> float:
    """Env steps/s of `act(obs, is_first) -> env action` for `seconds` (or `max_steps`)."""
    obs, _ = env.reset()
    is_first = True
    steps = 0
    start = time.perf_counter()
    while steps < max_steps and time.perf_counter() - start < seconds:
        obs, _, terminated, truncated, _ = env.step(act(obs, is_first))
        steps += 1
        is_first = False
        if terminated or truncated:
            obs, _ = env.reset()
            is_first = True
    return steps / (time.perf_counter() - start)


def measure(name: str, preset: str, seconds: float, max_steps: int, seed: int = 0) -> dict:
    """Build `name`, then time random actions and the `preset` agent's policy on it."""
    start = time.perf_counter()
    env = envs.make(name, seed=seed)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    env.reset()
    reset_s = time.perf_counter() - start

    random_sps = _timed_steps(env, lambda obs, is_first: env.action_space.sample(), seconds, max_steps)

    obs_space, act_space = env.observation_space, env.action_space
    state = agent_lib.init(make_config([preset]).agent, spaces.obs_spec(obs_space),
                           spaces.action_spec(act_space), jax.random.PRNGKey(seed))
    carry = [agent_lib.initial_carry(state, 1)]
    key = [jax.random.PRNGKey(seed + 1)]
    policy_ms: list[float] = []

    def act(obs, is_first: bool):
        batch = spaces.batch_obs(obs_space, jax.tree.map(lambda x: np.asarray(x)[None], obs), 1)
        key[0], k = jax.random.split(key[0])
        t0 = time.perf_counter()
        action, carry[0] = agent_lib.policy(state, carry[0], {**batch, "is_first": np.array([is_first])}, k)
        action = np.asarray(action)  # the host needs it back every step
        policy_ms.append(1000 * (time.perf_counter() - t0))
        return spaces.env_actions(act_space, action)[0]

    _timed_steps(env, act, seconds=float("inf"), max_steps=3)  # compile outside the timing
    policy_ms.clear()
    policy_sps = _timed_steps(env, act, seconds, max_steps)
    env.close()
    return {"build_s": build_s, "reset_s": reset_s, "random_sps": random_sps,
            "policy_sps": policy_sps, "policy_ms": float(np.median(policy_ms))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(DEFAULT_ENVS), help="envs.make names")
    parser.add_argument("--preset", default="debug", help="worldmodels.config preset of the policy")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--max-steps", type=int, default=20_000, help="step cap per measurement")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; one env in this process; "
          f"policy preset {args.preset!r}")
    print(f"{'env':<30}{'build s':>9}{'reset s':>9}{'random steps/s':>16}{'policy steps/s':>16}"
          f"{'policy ms':>11}")
    for name in args.envs:
        r = measure(name, args.preset, args.seconds, args.max_steps)
        print(f"{name:<30}{r['build_s']:>9.2f}{r['reset_s']:>9.2f}{r['random_sps']:>16,.0f}"
              f"{r['policy_sps']:>16,.0f}{r['policy_ms']:>11.2f}", flush=True)
    print(f"MuJoCo renderer: MUJOCO_GL={os.environ.get('MUJOCO_GL')}")


if __name__ == "__main__":
    main()
