"""Run in a subprocess by test_sharding.py: one update and one policy step of the debug agent on a
mesh of all visible devices (set XLA_FLAGS=--xla_force_host_platform_device_count=N before it
starts), written to an .npz: `python tests/sharded_step.py OUT.npz [MESH]` (MESH: a --run.mesh spec,
default "data")."""

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import sine_batch  # noqa: E402

from worldmodels import agent as agent_lib  # noqa: E402
from worldmodels import sharding  # noqa: E402
from worldmodels.agent import ActionSpec  # noqa: E402
from worldmodels.config import make_config  # noqa: E402


def main(out: str, spec: str = "data") -> None:
    mesh = sharding.make_mesh(spec)
    config = make_config(["debug"]).agent
    state = agent_lib.init(config, {"vector": ((3,), "float32")}, ActionSpec(2, True), jax.random.PRNGKey(0))
    state = sharding.put_state(state, mesh)
    key = sharding.put_replicated(jax.random.PRNGKey(1), mesh)
    batch = sine_batch(b=8, t=16)
    before = agent_lib.TRACE_COUNTS["train"]
    hlo = agent_lib.lower_train(state, batch, key, mesh).compile().as_text()
    new, metrics, _ = agent_lib.train(state, batch, key, mesh)
    new, metrics2, _ = agent_lib.train(new, batch, key, mesh)  # neither update traces again
    traces = agent_lib.TRACE_COUNTS["train"] - before
    params = jax.tree_util.tree_flatten_with_path(jax.device_get(new.params))[0]
    # the policy step on 8 envs split over the devices, from the trained state
    carry = jax.device_put(agent_lib.initial_carry(new, 8), sharding.split_batch(mesh))
    obs = sharding.put_split({"vector": batch["vector"][:, 0], "is_first": np.ones(8, bool)}, mesh)
    action, carry = agent_lib.policy(new, carry, obs, jax.random.PRNGKey(2))
    action_greedy, _ = agent_lib.policy(new, carry, obs, jax.random.PRNGKey(3), True)
    split = [x for x in jax.tree.leaves(new) if not x.sharding.is_fully_replicated]
    np.savez(out, devices=len(mesh.devices.flat), traces=traces, all_reduce="all-reduce" in hlo,
             all_gather="all-gather" in hlo, state_sharding=str(new.step.sharding),
             split_leaves=len(split), split_bytes=sum(x.nbytes for x in split),
             state_bytes=sum(x.nbytes for x in jax.tree.leaves(new)),
             split_shard_bytes=sum(x.addressable_shards[0].data.nbytes for x in split),
             **{f"metric/{k}": np.asarray(v) for k, v in jax.device_get(metrics2).items()},
             **{f"param/{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in params},
             action=np.asarray(action), action_greedy=np.asarray(action_greedy),
             latent=np.concatenate([np.asarray(x).reshape(8, -1) for x in jax.tree.leaves(carry.latent)], 1))


if __name__ == "__main__":
    main(*sys.argv[1:])
