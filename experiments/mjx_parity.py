"""How far the MJX ports (`envs.jax.mjx`) drift from dm_control: `python -m experiments.mjx_parity`.

For each task: reset the MJX env, put its initial joint positions and velocities into dm_control's
physics (same task, `suite.load`), then step both with the same random actions in [-1, 1] (action
repeat 2 on both sides, rewards summed) and compare the observations (dm_control's observation dict
flattened in its order, against the MJX vector) and the rewards. Prints, per task, the largest
absolute observation error at reset (where the two define an observation differently), and the
largest observation and reward errors over the first 10 and all `--steps` env steps.

MJX runs in float32, dm_control in float64, and Playground's models differ in places (solver
settings, contact parameters; see its README), so errors grow with time, and most on tasks with
contacts. Tasks whose initial state is more than joint positions and velocities (a randomly placed
target: reacher, finger-turn, fish, point_mass, ball_in_cup) are left out: their targets live in
different places in the two models.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

# Tasks whose whole initial state is qpos and qvel (see the module docstring).
COMPARABLE = ("acrobot-swingup", "cartpole-balance", "cartpole-swingup", "cheetah-run", "finger-spin",
              "hopper-stand", "humanoid-stand", "pendulum-swingup", "swimmer-swimmer6", "walker-walk")


@dataclass(frozen=True)
class Drift:
    """Largest absolute errors between the MJX port and dm_control."""

    task: str
    steps: int
    obs_error_at_reset: float  # different observation definitions show here; dynamics drift later
    obs_error_first10: float
    obs_error: float
    reward_error_first10: float
    reward_error: float
    obs_scale: float  # the largest |observation| seen in dm_control, for scale


def drift(task: str, steps: int = 100, seed: int = 0) -> Drift:
    """Step the MJX port of `task` and dm_control's task from the same state with the same actions
    (`steps` env steps of action repeat 2); see the module docstring."""
    import jax
    import jax.numpy as jnp

    from envs.jax.mjx import MjxSuite
    from envs.rendering import import_mujoco_module

    suite = import_mujoco_module("dm_control.suite", "dmc", need_rendering=False)
    env = MjxSuite(task, action_repeat=2)
    state, timestep = jax.jit(env.reset)((), jax.random.PRNGKey(seed))
    step = jax.jit(env.step)
    domain, name = task.split("-", 1)
    reference = suite.load(domain, name, task_kwargs={"random": seed})
    reference.reset()
    physics = reference.physics
    with physics.reset_context():
        physics.data.qpos[:] = np.asarray(state.physics.data.qpos, np.float64)
        physics.data.qvel[:] = np.asarray(state.physics.data.qvel, np.float64)
    flat = lambda obs: np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in obs.values()])
    ref_obs = flat(reference.task.get_observation(physics))
    mjx_obs = np.asarray(timestep.obs, np.float64)
    if ref_obs.shape != mjx_obs.shape:
        raise ValueError(f"{task}: dm_control observes {ref_obs.shape[0]} values, the MJX port {mjx_obs.shape[0]}")
    actions = np.random.default_rng(seed).uniform(-1, 1, (steps, env.action_size))
    obs_errors, reward_errors, scale = [np.abs(ref_obs - mjx_obs).max()], [], np.abs(ref_obs).max()
    for t in range(steps):
        state, timestep = step((), state, jnp.asarray(actions[t], jnp.float32), jax.random.PRNGKey(0))
        reward = 0.0
        for _ in range(2):
            ref = reference.step(actions[t])
            reward += ref.reward or 0.0
        ref_obs = flat(ref.observation)
        scale = max(scale, np.abs(ref_obs).max())
        obs_errors.append(np.abs(ref_obs - np.asarray(timestep.obs, np.float64)).max())
        reward_errors.append(abs(reward - float(timestep.reward)))
    return Drift(task, steps, float(obs_errors[0]), float(max(obs_errors[:11])), float(max(obs_errors)), float(max(reward_errors[:10])),
                 float(max(reward_errors)), float(scale))


def main(argv: list[str] | None = None) -> list[Drift]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(COMPARABLE))
    parser.add_argument("--steps", type=int, default=100, help="env steps (2 control steps each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("| task | max abs obs error at reset | first 10 steps | over all steps | max abs reward error, first 10 | over all "
          "| largest abs obs |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for task in args.tasks:
        d = drift(task, args.steps, args.seed)
        results.append(d)
        print(f"| {task} | {d.obs_error_at_reset:.2e} | {d.obs_error_first10:.2e} | {d.obs_error:.2e} | {d.reward_error_first10:.2e} | "
              f"{d.reward_error:.2e} | {d.obs_scale:.3g} |", flush=True)
    print(f"({args.steps} env steps of action repeat 2, uniform random actions, seed {args.seed})")
    return results


if __name__ == "__main__":
    main()
