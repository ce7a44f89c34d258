"""Many devices: a `jax.sharding.Mesh` over the visible devices and the shardings the train and policy
steps use on it.

Data parallelism is GSPMD's: the train step is jitted with explicit input and output shardings
(the agent state and PRNG key replicated, the replayed batch split along B over the mesh's `data`
axis), and XLA inserts the gradient reduction across devices itself. The policy step splits the env
batch the same way. Nothing here is specific to one or many hosts: a mesh spans whatever devices
`jax.devices()` lists.

A mesh is named by a string (`--run.mesh`): "data" puts every device on one `data` axis (the
default); "data=4" uses the first 4.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(spec: str = DATA, devices: list | None = None) -> Mesh:
    """The mesh named by `spec` over `devices` (default: all of `jax.devices()`).

    **Raises:** ValueError naming the problem and valid specs for anything but "data" / "data=N".
    """
    devices = list(jax.devices() if devices is None else devices)
    count = devices_asked(spec)
    n = len(devices) if count is None else count
    if not 1 <= n <= len(devices):
        raise ValueError(f"run.mesh {spec!r} asks for {n} devices; {len(devices)} are visible "
                         f"(use 'data' or 'data=1' ... 'data={len(devices)}')")
    # Auto axes: GSPMD propagates the shardings given at the jit boundary (make_mesh's default is Explicit)
    return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=devices[:n])


def devices_asked(spec: str) -> int | None:
    """How many devices a mesh spec asks for: None for "data" (all of them), N for "data=N".

    **Raises:** ValueError naming the valid specs for anything else.
    """
    name, _, count = spec.partition("=")
    if name != DATA or (count and (not count.isdigit() or int(count) < 1)):
        raise ValueError(f"run.mesh {spec!r} is not a mesh this agent runs on: use 'data' (every visible device "
                         "on a data axis) or 'data=N' (the first N)")
    return int(count) if count else None


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_batch(mesh: Mesh) -> NamedSharding:
    """Arrays `[B, ...]` split along their first axis over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def check_batch(what: str, size: int, mesh: Mesh) -> None:
    """Refuse a batch the `data` axis does not divide, naming the nearest sizes that it does."""
    n = data_size(mesh)
    if size % n:
        below, above = size // n * n, (size // n + 1) * n
        nearest = " or ".join(str(s) for s in (below, above) if s > 0)
        raise ValueError(f"{what} {size} does not split over the mesh's {n} devices: use a multiple of {n} "
                         f"(nearest: {nearest})")


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of `tree` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def put_split(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays `[B, ...]` onto the mesh, split along B, in one transfer."""
    return jax.device_put(dict(batch), split_batch(mesh))
