"""Many devices: a `jax.sharding.Mesh` over the visible devices and the shardings the train and policy
steps use on it.

Data parallelism is GSPMD's: the train step is jitted with explicit input and output shardings
(the agent state and PRNG key replicated, the replayed batch split along B over the mesh's `data`
axis), and XLA inserts the gradient reduction across devices itself. The policy step splits the env
batch the same way.

Many processes (hosts): `initialize_distributed` joins them (`jax.distributed`); a mesh then spans
every process's devices. Each process feeds its own rows of a global batch (`put_global_batch`),
reads its own rows back (`local_rows`), and acts with its own copy of the replicated state
(`local_copy`); every jitted call on mesh arrays must be made by all processes in the same order.

A mesh is named by a string (`--run.mesh`): "data" puts every device on one `data` axis (the
default); "data=4" uses the first 4; "data=2,fsdp=4" adds an `fsdp` axis over which the agent state's
big arrays (parameters and optimiser moments) are split, for models too big to copy on every device:
XLA gathers each where the step needs it (ZeRO-3 / FSDP, by GSPMD).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Mapping

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
# The smallest state array an fsdp axis splits: smaller ones (biases, norms, small heads) stay on every
# device, where gathering them would cost more than they weigh.
FSDP_MIN_SIZE = 1 << 12


def make_mesh(spec: str = DATA, devices: list | None = None) -> Mesh:
    """The mesh named by `spec` over `devices` (default: all of `jax.devices()`).

    "data" / "data=N": every device (or the first N) on a `data` axis. "data=N,fsdp=M" or "fsdp=M"
    (data: the devices left): N x M devices, the batch split over all of them and the agent state's
    big arrays split over the `fsdp` axis (`state_shardings`).

    **Raises:** ValueError naming the problem and the valid specs.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = parse_mesh(spec)
    data = len(devices) // fsdp if data is None else data
    n = data * fsdp
    if not 1 <= n <= len(devices) or data < 1:
        raise ValueError(f"run.mesh {spec!r} asks for {max(n, fsdp)} devices; {len(devices)} are visible "
                         f"(use 'data' or 'data=1' ... 'data={len(devices)}', or data=N,fsdp=M with N x M <= "
                         f"{len(devices)})")
    # Auto axes: GSPMD propagates the shardings given at the jit boundary (make_mesh's default is Explicit)
    if fsdp == 1 and FSDP not in spec:
        return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=devices[:n])
    return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


def parse_mesh(spec: str) -> tuple[int | None, int]:
    """(data devices or None for "the rest", fsdp devices) of a mesh spec.

    **Raises:** ValueError naming the valid specs.
    """
    sizes = {}
    for part in spec.split(","):
        name, _, count = part.strip().partition("=")
        if name not in (DATA, FSDP) or name in sizes or (count and (not count.isdigit() or int(count) < 1)) \
                or (name == FSDP and not count):
            raise ValueError(f"run.mesh {spec!r} is not a mesh this agent runs on: use 'data' (every visible device "
                             "on a data axis), 'data=N' (the first N), or 'data=N,fsdp=M' / 'fsdp=M' (the agent "
                             "state's big arrays split over M devices)")
        sizes[name] = int(count) if count else None
    return sizes.get(DATA), sizes.get(FSDP, 1)


def devices_asked(spec: str) -> int | None:
    """How many devices a mesh spec asks for: None for all of them.

    **Raises:** ValueError naming the valid specs.
    """
    data, fsdp = parse_mesh(spec)
    return None if data is None else data * fsdp


def data_size(mesh: Mesh) -> int:
    """The devices each batch is split over (all of the mesh's: data x fsdp)."""
    return mesh.devices.size


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_batch(mesh: Mesh) -> NamedSharding:
    """Arrays `[B, ...]` split along their first axis over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names) if FSDP in mesh.axis_names else DATA))


def check_batch(what: str, size: int, mesh: Mesh) -> None:
    """Refuse a batch the mesh's devices do not divide, naming the nearest sizes that they do."""
    n = data_size(mesh)
    if size % n:
        below, above = size // n * n, (size // n + 1) * n
        nearest = " or ".join(str(s) for s in (below, above) if s > 0)
        raise ValueError(f"{what} {size} does not split over the mesh's {n} devices: use a multiple of {n} "
                         f"(nearest: {nearest})")


def state_specs(tree: Any, mesh: Mesh) -> tuple:
    """How the agent state lies on the mesh, hashable (for jit's cache): `(treedef, PartitionSpec per
    array leaf)`. Without an fsdp axis every leaf is replicated; with one, each array of at least
    `FSDP_MIN_SIZE` elements is split along its largest dimension that the fsdp axis divides (the
    optimiser's moments, shaped as the parameters, alike), so each device holds 1/M of it."""
    leaves, treedef = jax.tree.flatten(tree)
    fsdp = mesh.shape.get(FSDP, 1) if FSDP in mesh.axis_names else 1

    def spec(x) -> PartitionSpec:
        shape = getattr(x, "shape", ())
        if fsdp == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
            return PartitionSpec()
        dims = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0]
        if not dims:
            return PartitionSpec()
        return PartitionSpec(*[FSDP if d == dims[0] else None for d in range(len(shape))])

    return treedef, tuple(spec(x) for x in leaves)


def state_shardings(specs: tuple, mesh: Mesh) -> Any:
    """The `NamedSharding` tree of `state_specs`."""
    treedef, leaf_specs = specs
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in leaf_specs])


def put_state(tree: Any, mesh: Mesh) -> Any:
    """The agent state onto the mesh as `state_specs` lays it out (replicated without an fsdp axis)."""
    return jax.device_put(tree, state_shardings(state_specs(tree, mesh), mesh))


def put_committed(tree: Any) -> Any:
    """`tree`'s arrays committed to the device they are on (the default device for fresh ones). jit
    compiles a function again for committed arguments where it had uncommitted ones, and a checkpoint
    restores committed arrays: a fresh run's state put here shares its compiled steps with a resumed run
    of the same program (e.g. both in one notebook or test process)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) else x, tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of `tree` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def put_split(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays `[B, ...]` onto the mesh, split along B, in one transfer."""
    return jax.device_put(dict(batch), split_batch(mesh))


# -- many processes ------------------------------------------------------------------------------


def initialize_distributed(coordinator: str, num_processes: int = 0, process_id: int = -1,
                           timeout_s: int = 60) -> None:
    """Join the processes of a multi-host run (`jax.distributed.initialize`); call before anything
    touches a device.

    `coordinator`: "" (one process: nothing to do), "host:port" of process 0, or "auto": JAX detects
    the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU pods, or `JAX_COORDINATOR_ADDRESS`).
    `num_processes` 0 and `process_id` -1 leave them to that detection.

    **Raises:** RuntimeError naming the coordinator when it cannot be reached within `timeout_s`
    seconds, or when the processes cannot be detected.
    """
    if not coordinator:
        return
    address = None if coordinator == "auto" else coordinator
    if address is not None and process_id != 0:
        # jax aborts the process (no Python error) when the coordinator cannot be reached: check first
        _wait_for_coordinator(address, timeout_s)
    try:
        jax.distributed.initialize(address, num_processes=num_processes or None,
                                   process_id=None if process_id < 0 else process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:
        where = "the coordinator that JAX detects" if address is None else f"the coordinator at {address}"
        raise RuntimeError(
            f"could not join the multi-process run through {where} within {timeout_s} s "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Start every process with the same "
            "--run.coordinator host:port (process 0's host, a free port), --run.num-processes and its own "
            "--run.process-id, and check that the port is reachable; --run.coordinator-timeout sets the wait"
        ) from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once a TCP connection to `address` ("host:port") opens; raise RuntimeError naming it after
    `timeout_s` seconds of trying."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"--run.coordinator {address!r} is not host:port (e.g. 10.0.0.1:1234, process 0's host)")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the coordinator at {address} could not be reached within {timeout_s:g} s ({e}): start process 0 "
                    "(--run.process-id 0) on that host first, check the address and that the port is open, or "
                    "raise --run.coordinator-timeout") from None
            time.sleep(0.25)


def put_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows `[B / processes, ...]` as its part of a global batch `[B, ...]` split along B
    over the mesh (`jax.make_array_from_process_local_data`); every process calls it with its own rows."""
    return {k: jax.make_array_from_process_local_data(split_batch(mesh), np.asarray(v))
            for k, v in local_batch.items()}


def local_rows(tree: Any, mesh: Mesh) -> Any:
    """This process's rows of global arrays split along B (the inverse of `put_global_batch`), as numpy."""
    from jax.experimental import multihost_utils

    local = multihost_utils.global_array_to_host_local_array(tree, mesh, PartitionSpec(DATA))
    return jax.device_get(local)


def local_copy(tree: Any) -> Any:
    """Arrays that span other processes' devices as this process's own copy, for programs that run on
    this process alone (the policy, evaluation): a replicated one's copy on its first device (no
    transfer), an fsdp-split one gathered (a collective: every process must call this together)."""
    from jax.experimental import multihost_utils

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return x.addressable_data(0)
            return jax.numpy.asarray(multihost_utils.process_allgather(x, tiled=True))  # fsdp: a collective
        return x

    return jax.tree.map(local, tree)


def broadcast_from_process_0(tree: Any) -> Any:
    """Every process gets process 0's array leaves of `tree` (same structure and shapes everywhere)."""
    from jax.experimental import multihost_utils

    arrays, rest = eqx.partition(tree, eqx.is_array)
    arrays = multihost_utils.broadcast_one_to_all(jax.device_get(arrays))
    return eqx.combine(jax.tree.map(jax.numpy.asarray, arrays), rest)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def all_processes_steps(steps: list[int]) -> list[int]:
    """The steps that every process lists (a collective), ascending."""
    from jax.experimental import multihost_utils

    padded = np.full(64, -1, np.int32)
    recent = sorted(steps)[-64:]
    padded[:len(recent)] = recent
    gathered = multihost_utils.process_allgather(padded)
    common = set(gathered[0].tolist())
    for row in gathered[1:]:
        common &= set(row.tolist())
    return sorted(s for s in common if s >= 0)
