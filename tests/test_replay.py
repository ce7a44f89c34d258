"""Tests for worldmodels.replay.ReplayBuffer.

Every written step encodes (env, global step index t) in its values, so a
sampled window can be checked against an independent truth: one env,
consecutive t, only t that were written and are still stored.
"""

import io

import numpy as np
import pytest

from worldmodels.replay import ReplayBuffer

IMAGE = (4, 4, 3)
SPEC = {
    "env": ((), np.int32),
    "t": ((), np.int64),
    "vector": ((2,), np.float32),
    "image": (IMAGE, np.uint8),
    "is_first": ((), bool),
}
SENTINEL_T = -7


def make_step(num_envs: int, t: int) -> dict[str, np.ndarray]:
    env = np.arange(num_envs)
    return {
        "env": env.astype(np.int32),
        "t": np.full(num_envs, t, np.int64),
        "vector": np.stack([env * 1000.0 + t, -env * 1000.0 - t], -1).astype(np.float32),
        # 200 + ... > 127 checks uint8 is not squeezed through int8.
        "image": np.broadcast_to(((200 + 7 * env + t) % 256).astype(np.uint8)[:, None, None, None], (num_envs, *IMAGE)).copy(),
        "is_first": np.full(num_envs, t % 5 == 0),
    }


def filled(capacity: int, num_envs: int, steps: int) -> ReplayBuffer:
    buf = ReplayBuffer(SPEC, capacity, num_envs)
    for t in range(steps):
        buf.add(make_step(num_envs, t))
    return buf


def check_windows(batch: dict[str, np.ndarray], seq_len: int, lo: int, hi: int) -> None:
    """Each window is one env, consecutive t, all t in [lo, hi); values match the encoding."""
    env, t = batch["env"], batch["t"]
    assert t.shape == env.shape == (len(t), seq_len)
    assert (env == env[:, :1]).all(), "window mixes env streams"
    assert (np.diff(t, axis=1) == 1).all(), "window is not consecutive in time"
    assert (t >= lo).all() and (t < hi).all(), f"window has t outside [{lo}, {hi})"
    np.testing.assert_array_equal(batch["vector"][..., 0], env * 1000.0 + t)
    np.testing.assert_array_equal(batch["vector"][..., 1], -env * 1000.0 - t)
    np.testing.assert_array_equal(batch["image"][:, :, 0, 0, 0], (200 + 7 * env + t) % 256)
    assert (batch["image"] == batch["image"][..., :1, :1, :1]).all()
    np.testing.assert_array_equal(batch["is_first"], t % 5 == 0)


def test_sample_shapes_and_dtypes():
    buf = filled(capacity=30, num_envs=3, steps=6)
    batch = buf.sample(5, 4, np.random.default_rng(0))
    assert set(batch) == set(SPEC)
    for key, (shape, dtype) in SPEC.items():
        assert batch[key].shape == (5, 4, *shape)
        assert batch[key].dtype == np.dtype(dtype)
    assert batch["image"].dtype == np.uint8
    assert batch["image"].max() > 127


def test_before_full_never_reads_unwritten_slots():
    num_envs, cap = 3, 30
    buf = ReplayBuffer(SPEC, cap, num_envs)
    # Put a sentinel in all storage (through the public checkpoint path), then write 6 steps.
    state = {k: np.full(v.shape, np.array(SENTINEL_T).astype(v.dtype))
             for k, v in buf.state_template(buf.capacity_per_env).items()}
    state["counter/written"] = np.array(0, np.int64)
    buf.load_state_dict(state)
    for t in range(6):
        buf.add(make_step(num_envs, t))
    assert len(buf) == 18
    batch = buf.sample(2000, 3, np.random.default_rng(1))
    assert (batch["t"] != SENTINEL_T).all()
    check_windows(batch, 3, 0, 6)
    # Full-length window: exactly the written history.
    batch = buf.sample(50, 6, np.random.default_rng(2))
    assert (batch["t"] == np.arange(6)).all()


def test_after_wraparound_only_newest_steps_and_no_jump_across_write_pointer():
    num_envs, per_env, steps, seq_len = 2, 10, 27, 4
    buf = filled(num_envs * per_env, num_envs, steps)
    assert len(buf) == num_envs * per_env
    batch = buf.sample(4000, seq_len, np.random.default_rng(3))
    check_windows(batch, seq_len, steps - per_env, steps)
    # Every valid (env, start) appears, and nothing else.
    seen = set(zip(batch["env"][:, 0].tolist(), batch["t"][:, 0].tolist()))
    valid = {(e, s) for e in range(num_envs) for s in range(steps - per_env, steps - seq_len + 1)}
    assert seen == valid


def test_window_of_full_ring_is_chronological_after_wrap():
    # seq_len == per-env capacity: the only window per env spans the physical ring end.
    buf = filled(capacity=12, num_envs=2, steps=15)
    batch = buf.sample(100, 6, np.random.default_rng(4))
    assert (batch["t"] == np.arange(9, 15)).all()
    assert set(batch["env"][:, 0].tolist()) == {0, 1}


def test_sampling_is_uniform_over_valid_windows():
    num_envs, per_env, steps, seq_len, n = 2, 5, 13, 2, 16000
    buf = filled(num_envs * per_env, num_envs, steps)
    batch = buf.sample(n, seq_len, np.random.default_rng(5))
    starts_per_env = per_env - seq_len + 1
    idx = batch["env"][:, 0] * starts_per_env + (batch["t"][:, 0] - (steps - per_env))
    counts = np.bincount(idx, minlength=num_envs * starts_per_env)
    assert len(counts) == num_envs * starts_per_env
    expected = n / len(counts)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30.0, (chi2, counts)  # df=7; p(chi2 > 30) ~ 1e-4 under uniformity


def test_capacity_len_nbytes_and_describe():
    buf = ReplayBuffer(SPEC, capacity=25, num_envs=3)  # 8 per env, remainder dropped
    assert buf.capacity_per_env == 8 and buf.capacity == 24
    per_step = 4 + 8 + 2 * 4 + int(np.prod(IMAGE)) + 1  # env, t, vector, image, is_first
    assert buf.nbytes == 3 * 8 * per_step
    for t in range(20):
        assert len(buf) == 3 * min(t, 8)
        assert buf.can_sample(3) == (min(t, 8) >= 3)
        buf.add(make_step(3, t))
        assert len(buf) <= buf.capacity
    assert len(buf) == 24
    assert not buf.can_sample(9) and buf.can_sample(8)
    assert buf.describe() == f"replay: 24 steps (3 envs x 8), {buf.nbytes / 1024:.2f} KiB"

    big = ReplayBuffer({"image": ((64, 64, 3), np.uint8)}, capacity=100_000, num_envs=2)
    assert big.nbytes == 100_000 * 64 * 64 * 3
    assert big.describe() == "replay: 100000 steps (2 envs x 50000), 1.14 GiB"


def test_capacity_smaller_than_num_envs_raises():
    with pytest.raises(ValueError, match="too small"):
        ReplayBuffer(SPEC, capacity=3, num_envs=4)


def test_add_validates_keys_shapes_and_dtypes():
    buf = ReplayBuffer(SPEC, 20, 2)
    step = make_step(2, 0)
    with pytest.raises(ValueError, match=r"'vector'.*\(2, 2\).*\(2, 3\)"):
        buf.add({**step, "vector": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'image'.*\(2, 4, 4, 3\).*\(4, 4, 3\)"):
        buf.add({**step, "image": step["image"][0]})
    with pytest.raises(ValueError, match="missing.*'t'"):
        buf.add({k: v for k, v in step.items() if k != "t"})
    with pytest.raises(ValueError, match="'image'.*dtype"):
        buf.add({**step, "image": step["image"].astype(np.float32)})
    assert len(buf) == 0  # failed adds write nothing
    buf.add({**step, "vector": step["vector"].astype(np.float64)})  # safe same-kind cast is fine
    assert len(buf) == 2 and buf.sample(1, 1, np.random.default_rng(0))["vector"].dtype == np.float32


def test_sample_with_too_few_steps_raises():
    buf = filled(capacity=20, num_envs=2, steps=3)
    with pytest.raises(ValueError, match=r"3 steps stored.*need at least 4"):
        buf.sample(2, 4, np.random.default_rng(0))
    with pytest.raises(ValueError):
        ReplayBuffer(SPEC, 20, 2).sample(1, 1, np.random.default_rng(0))


def test_state_dict_round_trip_is_exact():
    buf = filled(capacity=20, num_envs=2, steps=13)  # wrapped
    state = buf.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["counter/written"].dtype == np.int64
    # Through an actual file format to show it is checkpointable as-is.
    f = io.BytesIO()
    np.savez(f, **state)
    f.seek(0)
    loaded = dict(np.load(f))

    other = ReplayBuffer(SPEC, 20, 2)
    other.load_state_dict(loaded)
    assert len(other) == len(buf)
    for k, v in state.items():
        np.testing.assert_array_equal(other.state_dict()[k], v)
    a, b = buf.sample(64, 5, np.random.default_rng(9)), other.sample(64, 5, np.random.default_rng(9))
    for k in SPEC:
        np.testing.assert_array_equal(a[k], b[k])
    # Both continue identically, and are independent copies.
    for t in range(13, 17):
        buf.add(make_step(2, t))
        other.add(make_step(2, t))
    a, b = buf.sample(64, 5, np.random.default_rng(10)), other.sample(64, 5, np.random.default_rng(10))
    for k in SPEC:
        np.testing.assert_array_equal(a[k], b[k])
    check_windows(b, 5, 7, 17)


def test_state_dict_holds_the_stored_steps_only():
    buf = filled(capacity=20, num_envs=2, steps=3)
    state = buf.state_dict()
    assert state["data/t"].shape == (2, 3) and state["data/image"].shape == (2, 3, *IMAGE)
    template = buf.state_template(3)
    assert {k: (v.shape, v.dtype) for k, v in template.items()} == {k: (v.shape, v.dtype) for k, v in state.items()}
    assert filled(capacity=20, num_envs=2, steps=13).state_dict()["data/t"].shape == (2, 10)  # wrapped: all
    # The whole ring (as older checkpoints saved it) restores the same buffer.
    full = {k: np.zeros((2, 10, *v.shape[2:]), v.dtype) if k.startswith("data/") else v for k, v in state.items()}
    for k in state:
        if k.startswith("data/"):
            full[k][:, :3] = state[k]
    other = ReplayBuffer(SPEC, 20, 2)
    other.load_state_dict(full)
    for k, v in state.items():
        np.testing.assert_array_equal(other.state_dict()[k], v)


def test_load_state_dict_rejects_other_spec_or_capacity():
    state = filled(capacity=20, num_envs=2, steps=3).state_dict()
    wrapped = filled(capacity=20, num_envs=2, steps=13).state_dict()
    with pytest.raises(ValueError, match="another spec"):
        ReplayBuffer(SPEC, 30, 2).load_state_dict(wrapped)  # its ring order would not carry over
    with pytest.raises(ValueError, match="another spec"):
        ReplayBuffer(SPEC, 4, 2).load_state_dict(state)  # 3 stored steps per env do not fit in 2
    with pytest.raises(ValueError, match="another spec"):
        ReplayBuffer(SPEC, 20, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="another spec"):
        ReplayBuffer({**SPEC, "image": (IMAGE, np.float32)}, 20, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="another spec"):
        ReplayBuffer({k: v for k, v in SPEC.items() if k != "t"}, 20, 2).load_state_dict(state)


def test_update_writes_into_the_sampled_windows_only():
    buf = filled(capacity=40, num_envs=2, steps=13)
    batch, windows = buf.sample_windows(5, 4, np.random.default_rng(3))
    # Mark steps 1..3 of each window with -(its t); offset 1 leaves the first step alone.
    written = buf.update(windows, {"t": -batch["t"][:, 1:]}, offset=1)
    assert written == 5 * 3
    stored = buf.state_dict()["data/t"]
    marked = {(e, t) for e, ts in zip(batch["env"][:, 0], batch["t"][:, 1:]) for t in ts}
    for e in range(2):
        for t in range(13):
            assert stored[e, t] == (-t if (e, t) in marked else t)


def test_update_skips_steps_overwritten_since_the_sample():
    buf = filled(capacity=20, num_envs=2, steps=10)  # 10 slots per env, all written: t 0..9
    batch, windows = buf.sample_windows(8, 10, np.random.default_rng(0))  # every window covers t 0..9
    for t in range(10, 14):  # overwrite t 0..3
        buf.add(make_step(2, t))
    assert buf.update(windows, {"t": np.full((8, 10), SENTINEL_T)}) == 8 * 6
    stored = buf.state_dict()["data/t"]
    # t 10..13 took t 0..3's slots and must survive; t 4..9 were overwritten with the sentinel.
    np.testing.assert_array_equal(stored[:, :4], [[10, 11, 12, 13]] * 2)
    np.testing.assert_array_equal(stored[:, 4:], SENTINEL_T)
    with pytest.raises(ValueError, match="'vector'"):
        buf.update(windows, {"vector": np.zeros((8, 10, 3), np.float32)})
