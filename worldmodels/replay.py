"""Sequence replay for many parallel environments: a host buffer and a device one.

``ReplayBuffer`` (the host loop's) keeps numpy arrays in host memory. Each env
stream has its own FIFO ring of ``capacity // num_envs`` steps. All storage is
allocated once in ``__init__``, so the buffer can never grow past ``nbytes``
(see ``describe()``, meant to be printed when training starts).

``DeviceReplay`` (the device loop's) is the same ring as a PyTree of JAX arrays
with pure functions ``replay_init``, ``replay_add``, ``replay_sample``,
``replay_sample_windows``, ``replay_update`` and ``replay_stored``, so it can
live inside a compiled loop and be checkpointed with the rest of its carry
(``replay_stored_part`` and ``replay_pad`` leave out its empty part).

Both can overwrite values in windows they sampled (``update``, ``replay_update``):
the training loops write each update's posterior latents back (replay context).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

Spec = Mapping[str, tuple[tuple[int, ...], np.dtype | str]]

_WRITTEN = "counter/written"  # steps ever written per env stream (same for every env)
_DATA = "data/"  # prefix of the data arrays in state_dict()


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class Windows(NamedTuple):
    """Where sampled windows lie: env stream ``[B]`` and the absolute index (steps ever written to
    that stream before it) of each window's first step ``[B]``."""

    env: np.ndarray
    first_step: np.ndarray


class ReplayBuffer:
    """FIFO sequence replay over ``num_envs`` parallel env streams.

    Args:
      spec: per step key, ``(shape, dtype)`` of one env's value, e.g.
        ``{'image': ((64, 64, 3), np.uint8), 'reward': ((), np.float32)}``.
        Dtypes are kept exactly (images stay uint8).
      capacity: total steps over all envs. Each env gets ``capacity // num_envs``
        slots; the remainder (if any) is dropped.
      num_envs: number of parallel env streams; every ``add`` writes one step
        to each of them.

    Storage per key is ``[num_envs, capacity // num_envs, *shape]``. It is
    allocated with ``np.zeros`` up front; the OS may commit pages lazily, but
    resident memory never exceeds ``nbytes``.
    """

    def __init__(self, spec: Spec, capacity: int, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        per_env = capacity // num_envs
        if per_env < 1:
            raise ValueError(
                f"replay capacity {capacity} is too small for {num_envs} envs: "
                f"each env stream needs at least 1 step (capacity // num_envs = {per_env})"
            )
        self.spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            k: (tuple(int(d) for d in shape), np.dtype(dtype)) for k, (shape, dtype) in spec.items()
        }
        self.num_envs = num_envs
        self.capacity_per_env = per_env
        self._data = {
            k: np.zeros((num_envs, per_env, *shape), dtype) for k, (shape, dtype) in self.spec.items()
        }
        self._written = 0  # steps ever added per env; ring position is written % per_env

    # ----------------------------------------------------------------- sizes

    @property
    def capacity(self) -> int:
        """Total steps the buffer can hold (``num_envs * capacity_per_env``)."""
        return self.num_envs * self.capacity_per_env

    @property
    def nbytes(self) -> int:
        """Bytes of all preallocated data arrays (the buffer's fixed memory)."""
        return sum(a.nbytes for a in self._data.values())

    def describe(self) -> str:
        """One line, e.g. ``'replay: 100000 steps (2 envs x 50000), 1.23 GiB'``."""
        return (
            f"replay: {self.capacity} steps ({self.num_envs} envs x {self.capacity_per_env}), "
            f"{_human_bytes(self.nbytes)}"
        )

    @property
    def stored_per_env(self) -> int:
        """Steps currently stored in each env stream (``len(self) // num_envs``)."""
        return min(self._written, self.capacity_per_env)

    def __len__(self) -> int:
        """Steps currently stored, summed over env streams (<= ``capacity``)."""
        return self.num_envs * self.stored_per_env

    def can_sample(self, seq_len: int) -> bool:
        """Whether at least one window of ``seq_len`` consecutive stored steps exists."""
        return 1 <= seq_len <= self.stored_per_env

    # ----------------------------------------------------------------- write

    def add(self, step: Mapping[str, np.ndarray]) -> None:
        """Append one step to every env stream, overwriting the oldest when full.

        Args:
          step: for every spec key, an array ``[num_envs, *shape]``. Values are
            cast to the spec dtype; lossy kind changes (e.g. float -> uint8)
            are rejected. Nothing is written unless all keys are valid.
        """
        if set(step) != set(self.spec):
            missing, extra = set(self.spec) - set(step), set(step) - set(self.spec)
            raise ValueError(f"replay.add: step keys mismatch; missing {sorted(missing)}, unexpected {sorted(extra)}")
        values = {}
        for key, (shape, dtype) in self.spec.items():
            value = np.asarray(step[key])
            expected = (self.num_envs, *shape)
            if value.shape != expected:
                raise ValueError(f"replay.add: key '{key}' expected shape {expected}, got {value.shape}")
            if not np.can_cast(value.dtype, dtype, casting="same_kind"):
                raise ValueError(f"replay.add: key '{key}' expected dtype {dtype}, got {value.dtype}")
            values[key] = value
        slot = self._written % self.capacity_per_env
        for key, value in values.items():
            self._data[key][:, slot] = value
        self._written += 1

    # ---------------------------------------------------------------- sample

    def sample(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``sample_windows`` without the windows' positions."""
        return self.sample_windows(batch_size, seq_len, rng)[0]

    def sample_windows(self, batch_size: int, seq_len: int, rng: np.random.Generator
                       ) -> tuple[dict[str, np.ndarray], Windows]:
        """Sample windows of consecutive steps, uniformly over all valid windows.

        A window lies inside one env stream and follows written (chronological)
        order; it never touches unwritten slots or jumps across the write
        pointer. It may cross episode boundaries (marked by the data's own
        ``is_first``).

        Args:
          batch_size: number of windows B.
          seq_len: steps per window T.
          rng: source of randomness; the same generator state gives the same batch.

        Returns:
          (dict key -> array ``[B, T, *shape]`` with the spec dtype (a copy), the windows' positions
          for ``update``).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"replay.sample: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        stored = self.stored_per_env
        if not self.can_sample(seq_len):
            raise ValueError(
                f"replay.sample: not enough data for seq_len={seq_len}: {stored} steps stored "
                f"per env stream ({len(self)} in total over {self.num_envs} envs), "
                f"need at least {seq_len} per env stream"
            )
        starts_per_env = stored - seq_len + 1
        flat = rng.integers(0, self.num_envs * starts_per_env, size=batch_size)
        env, start = np.divmod(flat, starts_per_env)
        # Chronological index i lives at physical slot (oldest + i) % cap.
        oldest = (self._written - stored) % self.capacity_per_env
        slots = (oldest + start[:, None] + np.arange(seq_len)) % self.capacity_per_env  # [B, T]
        windows = Windows(env, self._written - stored + start)
        return {k: a[env[:, None], slots] for k, a in self._data.items()}, windows

    def update(self, windows: Windows, values: Mapping[str, np.ndarray], offset: int = 0) -> int:
        """Overwrite stored values in sampled windows: ``values[k][b, i]`` goes to step ``offset + i``
        of window ``b``. Steps overwritten by newer data since the sample are skipped.

        Args:
          windows: positions from ``sample_windows``.
          values: key -> ``[B, L, *shape]`` for some spec keys.
          offset: where in the windows the values start.

        Returns:
          how many steps were written (per key).
        """
        steps = windows.first_step[:, None] + offset + np.arange(next(iter(values.values())).shape[1])
        keep = steps >= self._written - self.stored_per_env  # still stored
        env = np.broadcast_to(windows.env[:, None], steps.shape)[keep]
        slots = steps[keep] % self.capacity_per_env
        for key, value in values.items():
            shape, dtype = self.spec[key]
            value = np.asarray(value)
            if value.shape[2:] != shape or not np.can_cast(value.dtype, dtype, casting="same_kind"):
                raise ValueError(f"replay.update: key '{key}' expected [B, L, *{shape}] {dtype}, "
                                 f"got {value.shape} {value.dtype}")
            self._data[key][env, slots] = value[keep]
        return int(keep.sum())

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays for checkpointing: the stored part of the buffer only.

        Keys are ``'data/<spec key>'`` (``[num_envs, stored, *shape]``, ``stored`` =
        ``min(steps written per env, capacity_per_env)``; the ring fills slots in order, so
        these are its written slots) and ``'counter/written'`` (int64 scalar). Data arrays are
        read-only views of the buffer's storage, not copies, so a big buffer is not duplicated
        in RAM; save them before the next ``add``. ``state_template`` gives their shapes for a
        restore.
        """
        stored = self.stored_per_env
        state: dict[str, np.ndarray] = {}
        for key, array in self._data.items():
            view = array[:, :stored]
            view.flags.writeable = False
            state[_DATA + key] = view
        state[_WRITTEN] = np.array(self._written, np.int64)
        return state

    def state_template(self, stored_per_env: int) -> dict[str, np.ndarray]:
        """The restore target of a checkpoint of a buffer like this one holding ``stored_per_env``
        steps per env stream: ``state_dict()``'s keys, shapes and dtypes, as writeable views of this
        buffer's first slots (``Checkpointer.restore`` fills them in place, so a big replay is not
        held twice) and a fresh counter. Pass what the restore returns to ``load_state_dict``. Meant
        for a fresh buffer: a restore that fails leaves it partly overwritten."""
        if not 0 <= stored_per_env <= self.capacity_per_env:
            raise ValueError(f"replay.state_template: stored_per_env must be in [0, {self.capacity_per_env}], "
                             f"got {stored_per_env}")
        template = {_DATA + k: array[:, :stored_per_env] for k, array in self._data.items()}
        template[_WRITTEN] = np.zeros((), np.int64)
        return template

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore exactly from ``state_dict()`` output of a buffer with the same spec,
        capacity and num_envs (data is copied into this buffer's storage, unless it is there
        already: arrays from ``state_template`` that a restore filled in place). Data arrays
        holding more than the stored steps, up to the whole ring, are accepted too. Slots
        past them are left as they are: nothing reads a slot before it is written, and not
        touching them keeps a fresh buffer's pages uncommitted."""
        expected = {_DATA + k for k in self._data} | {_WRITTEN}
        if set(state) != expected:
            raise ValueError(
                "replay.load_state_dict: checkpoint comes from a replay with another spec: "
                f"expected keys {sorted(expected)}, got {sorted(state)}"
            )
        written = np.asarray(state[_WRITTEN])
        if written.shape != () or not np.issubdtype(written.dtype, np.integer) or int(written) < 0:
            raise ValueError(f"replay.load_state_dict: '{_WRITTEN}' must be a non-negative integer scalar, "
                             f"got {written!r}")
        stored = min(int(written), self.capacity_per_env)
        for key, array in self._data.items():
            got = np.asarray(state[_DATA + key])
            if (got.ndim != array.ndim or got.shape[0] != array.shape[0] or got.shape[2:] != array.shape[2:]
                    or not stored <= got.shape[1] <= array.shape[1] or got.dtype != array.dtype):
                raise ValueError(
                    "replay.load_state_dict: checkpoint comes from a replay with another "
                    f"spec/capacity/num_envs: key '{key}' expected {(array.shape[0], stored, *array.shape[2:])} "
                    f"{array.dtype} ({stored} of {array.shape[1]} steps per env stored), got {got.shape} {got.dtype}"
                )
        for key, array in self._data.items():
            got = np.asarray(state[_DATA + key])
            if got.ctypes.data != array.ctypes.data or got.strides != array.strides:  # else restored in place
                np.copyto(array[:, :got.shape[1]], got)
        self._written = int(written)


# --------------------------------------------------------------------------- device replay

StepSpec = Mapping[str, tuple[tuple[int, ...], str]]


class DeviceReplay(NamedTuple):
    """A FIFO ring buffer of JAX arrays per env stream (a PyTree, carried through the scan).

    - `data`: key -> `[N, C, *shape]` (N env streams, C steps each).
    - `written`: int32 scalar, steps ever written per env stream (the same for every stream); the
      next write goes to slot `written % C`.
    """

    data: dict[str, Array]
    written: Int[Array, ""]


def replay_init(spec: StepSpec, num_envs: int, capacity_per_env: int) -> DeviceReplay:
    """An empty replay: zeros of `[num_envs, capacity_per_env, *shape]` per key of `spec`."""
    if num_envs < 1 or capacity_per_env < 1:
        raise ValueError(f"device replay needs num_envs >= 1 and capacity_per_env >= 1, got {num_envs}, "
                         f"{capacity_per_env}")
    data = {k: jnp.zeros((num_envs, capacity_per_env, *shape), dtype) for k, (shape, dtype) in spec.items()}
    return DeviceReplay(data, jnp.zeros((), jnp.int32))


def replay_add(replay: DeviceReplay, step: Mapping[str, Array]) -> DeviceReplay:
    """Write one step (key -> `[N, *shape]`) to every env stream, overwriting the oldest when full."""
    capacity = next(iter(replay.data.values())).shape[1]
    slot = replay.written % capacity
    data = {k: v.at[:, slot].set(jnp.asarray(step[k], v.dtype)) for k, v in replay.data.items()}
    return DeviceReplay(data, replay.written + 1)


def replay_stored(replay: DeviceReplay) -> Int[Array, ""]:
    """Steps currently stored per env stream."""
    capacity = next(iter(replay.data.values())).shape[1]
    return jnp.minimum(replay.written, capacity)


def replay_stored_part(replay: DeviceReplay, stored: int) -> DeviceReplay:
    """The replay cut to its first `stored` slots per env stream (`[N, stored, *shape]` per key): with
    `stored = int(replay_stored(replay))`, all it holds (the ring fills slots in order), e.g. to
    checkpoint it without the empty part. `replay_pad` undoes it. A full replay comes back as it is
    (slicing would copy it)."""
    if stored == next(iter(replay.data.values())).shape[1]:
        return replay
    return DeviceReplay({k: v[:, :stored] for k, v in replay.data.items()}, replay.written)


def replay_pad(replay: DeviceReplay, capacity_per_env: int) -> DeviceReplay:
    """A `replay_stored_part` result padded with zeros back to `capacity_per_env` slots per env stream."""
    if next(iter(replay.data.values())).shape[1] == capacity_per_env:
        return replay
    data = {}
    for k, v in replay.data.items():
        full = jnp.zeros((v.shape[0], capacity_per_env, *v.shape[2:]), v.dtype, device=v.sharding)
        data[k] = full.at[:, :v.shape[1]].set(v)
    return DeviceReplay(data, replay.written)


def replay_sample(replay: DeviceReplay, batch_size: int, seq_len: int, key: PRNGKeyArray) -> dict[str, Array]:
    """`replay_sample_windows` without the windows' slots."""
    return replay_sample_windows(replay, batch_size, seq_len, key)[0]


def replay_update(replay: DeviceReplay, env: Int[Array, " b"], slots: Int[Array, "b t"],
                  values: Mapping[str, Array], offset: int = 0) -> DeviceReplay:
    """Overwrite stored values in sampled windows (`env`, `slots` from `replay_sample_windows`, with
    nothing added since): `values[k][b, i]` (`[B, L, ...]`) goes to slot `offset + i` of window b."""
    length = next(iter(values.values())).shape[1]
    where = (env[:, None], slots[:, offset:offset + length])
    data = {k: v.at[where].set(values[k].astype(v.dtype)) if k in values else v for k, v in replay.data.items()}
    return DeviceReplay(data, replay.written)


def replay_sample_windows(replay: DeviceReplay, batch_size: int, seq_len: int, key: PRNGKeyArray
                          ) -> tuple[dict[str, Array], tuple[Int[Array, " b"], Int[Array, "b t"]]]:
    """`batch_size` windows of `seq_len` consecutive steps, uniform over all valid windows.

    As the host `ReplayBuffer.sample`: a window lies inside one env stream, in written order, never
    touches an unwritten slot or jumps across the write pointer; it may cross episode boundaries.
    Only meaningful when `replay_stored(replay) >= seq_len` (the caller checks; under jit it cannot
    raise), otherwise windows repeat the stored steps' slots.

    **Returns:** (key -> `[B, T, *shape]`, (env stream `[B]`, slots `[B, T]`) for `replay_update`).
    """
    num_envs, capacity = next(iter(replay.data.values())).shape[:2]
    stored = replay_stored(replay)
    starts_per_env = jnp.maximum(stored - seq_len + 1, 1)
    flat = jax.random.randint(key, (batch_size,), 0, num_envs * starts_per_env)
    env, start = flat // starts_per_env, flat % starts_per_env
    oldest = (replay.written - stored) % capacity  # chronological index i lives at slot (oldest + i) % C
    slots = (oldest + start[:, None] + jnp.arange(seq_len)) % capacity  # [B, T]
    return {k: v[env[:, None], slots] for k, v in replay.data.items()}, (env, slots)
