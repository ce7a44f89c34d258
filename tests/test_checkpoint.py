import os
import pickle
import tracemalloc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import worldmodels.checkpoint as checkpoint_lib
from worldmodels.checkpoint import CheckpointMismatchError, Checkpointer
from worldmodels.replay import ReplayBuffer


class Agent(eqx.Module):
    model: eqx.nn.MLP
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    name: str = eqx.field(static=True, default="agent")


def make_agent(seed: int, width: int = 8, typed_key: bool = False) -> Agent:
    model = eqx.nn.MLP(3, 2, width, 2, key=jax.random.PRNGKey(seed))
    opt_state = optax.adam(1e-3).init(eqx.filter(model, eqx.is_array))
    key = jax.random.key(seed + 100) if typed_key else jax.random.PRNGKey(seed + 100)
    return Agent(model, opt_state, jnp.int32(seed), key)


def perturb(agent: Agent, seed: int) -> Agent:
    """Random values in every float leaf, new counters, new key."""
    leaves, treedef = jax.tree.flatten(eqx.filter(agent, eqx.is_array))
    rng = np.random.default_rng(seed)
    new = [
        jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x + 7
        if jnp.issubdtype(x.dtype, jnp.integer)
        else x
        for x in leaves
    ]
    arrays = jax.tree.unflatten(treedef, new)
    agent = eqx.combine(arrays, eqx.filter(agent, eqx.is_array, inverse=True))
    return eqx.tree_at(lambda a: a.key, agent, jax.random.split(agent.key)[0])


def bits(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return x.view(np.uint8)
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))


def assert_trees_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if eqx.is_array(x):
            assert eqx.is_array(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert np.array_equal(bits(x), bits(y))
        else:
            assert x == y


def make_replay(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8),
        "is_first": rng.random(5) < 0.5,
        "counter": np.array([2**40 + 3, -5, 2**62], dtype=np.int64),
        "reward": rng.standard_normal(5).astype(np.float32),
        "scalar": np.array(123456789012, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }


def replay_template_like(replay):
    return {k: np.zeros_like(v) for k, v in replay.items()}


def test_round_trip_bit_exact(tmp_path):
    agent = perturb(make_agent(0), seed=1)
    replay = make_replay(0)
    gen = np.random.default_rng(1234)
    gen.random(17)
    meta = {
        "env_steps": 1234,
        "np_steps": np.int64(99),
        "config": {"lr": 1e-3, "layers": [1, 2], "name": "x", "nan": float("nan")},
        "rng": gen.bit_generator.state,
        "huge": 2**200 + 1,
    }
    env_state = pickle.dumps({"a": [1, 2, 3], "b": b"\x00\xff"})
    blobs = {"env": env_state, "empty": b"", "odd name/with.dots": bytes(range(256))}

    ck = Checkpointer(tmp_path / "ckpt")
    ck.save(10, agent, replay, meta, blobs)
    ck.close()

    ck = Checkpointer(tmp_path / "ckpt")  # fresh, as after a restart
    assert ck.latest_step() == 10
    template = make_agent(5)  # different values everywhere
    assert not np.array_equal(bits(template.model.layers[0].weight),
                              bits(agent.model.layers[0].weight))
    got_agent, got_replay, got_meta, got_blobs = ck.restore(
        template, replay_template_like(replay)
    )
    ck.close()

    assert_trees_bit_equal(got_agent, agent)
    assert got_agent.name == "agent"
    assert got_agent.model.activation is template.model.activation
    assert isinstance(got_agent.opt_state[0], optax.ScaleByAdamState)

    assert list(got_replay) == list(replay)
    for k, v in replay.items():
        assert isinstance(got_replay[k], np.ndarray), k
        assert got_replay[k].dtype == v.dtype and got_replay[k].shape == v.shape, k
        assert np.array_equal(got_replay[k], v), k

    assert got_meta["env_steps"] == 1234 and got_meta["np_steps"] == 99
    assert got_meta["huge"] == 2**200 + 1
    assert got_meta["config"]["layers"] == [1, 2]
    assert np.isnan(got_meta["config"]["nan"])
    gen2 = np.random.default_rng(0)
    gen2.bit_generator.state = got_meta["rng"]
    assert np.array_equal(gen2.random(10), gen.random(10))
    assert np.array_equal(gen2.integers(0, 2**63, 10), gen.integers(0, 2**63, 10))

    assert got_blobs == blobs
    assert pickle.loads(got_blobs["env"]) == {"a": [1, 2, 3], "b": b"\x00\xff"}


def test_typed_keys_and_no_replay(tmp_path):
    agent = perturb(make_agent(0, typed_key=True), seed=3)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, agent, None, {}, wait=True)
        got, replay, meta, blobs = ck.restore(make_agent(4, typed_key=True), None)
    assert replay is None and meta == {} and blobs == {}
    assert jax.dtypes.issubdtype(got.key.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(got.key) == jax.random.key_impl(agent.key)
    assert_trees_bit_equal(got, agent)
    # The restored key produces the same random numbers.
    assert np.array_equal(jax.random.normal(got.key, (4,)), jax.random.normal(agent.key, (4,)))


def test_replay_not_requested_or_not_saved(tmp_path):
    agent = make_agent(0)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, agent, make_replay(), {"a": 1}, wait=True)
        _, replay, _, _ = ck.restore(make_agent(1), None)
        assert replay is None
        ck.save(2, agent, None, {"a": 2}, wait=True)
        _, replay, meta, _ = ck.restore(make_agent(1), replay_template_like(make_replay()))
        assert replay is None and meta == {"a": 2}


def test_caller_may_modify_its_inputs_once_save_returns(tmp_path):
    agent = make_agent(0)
    replay = make_replay(0)
    expected = {k: v.copy() for k, v in replay.items()}
    with Checkpointer(tmp_path) as ck:
        ck.save(3, agent, replay, {})
        for v in replay.values():  # caller keeps filling its buffer
            v[...] = np.zeros_like(v)
        ck.wait()
        _, got, _, _ = ck.restore(make_agent(1), replay_template_like(replay))
    for k, v in expected.items():
        assert np.array_equal(got[k], v), k


def test_latest_step_and_max_to_keep(tmp_path):
    agent = make_agent(0)
    ck = Checkpointer(tmp_path, max_to_keep=2)
    assert ck.latest_step() is None
    for step in (5, 10, 15, 20):
        ck.save(step, agent, None, {"step": step})
    ck.save(20, agent, None, {"step": -1})  # existing step: skipped
    ck.close()
    ck = Checkpointer(tmp_path, max_to_keep=2)
    assert ck.latest_step() == 20
    assert ck.all_steps() == [15, 20]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["15", "20"]
    assert ck.restore(agent, None)[2] == {"step": 20}
    assert ck.restore(agent, None, step=15)[2] == {"step": 15}
    with pytest.raises(FileNotFoundError, match="step 5"):
        ck.restore(agent, None, step=5)
    ck.close()


def test_unfinalised_checkpoint_is_ignored(tmp_path):
    agent = make_agent(0)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, agent, None, {"step": 1}, wait=True)
    # What a crash in the middle of writing step 2 leaves behind.
    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (tmp_dir / "agent").mkdir(parents=True)
    (tmp_dir / "agent" / "junk").write_bytes(b"partial")
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 1
        assert ck.restore(agent, None)[2] == {"step": 1}
        ck.save(2, agent, None, {"step": 2}, wait=True)
        assert ck.latest_step() == 2


def test_mismatched_template_raises(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, make_agent(0, width=8), make_replay(), {}, wait=True)
        with pytest.raises(CheckpointMismatchError) as info:
            ck.restore(make_agent(0, width=16), replay_template_like(make_replay()))
        msg = str(info.value)
        assert "model.layers.0.weight" in msg
        assert "(8, 3) float32" in msg and "(16, 3) float32" in msg
        assert "different config" in msg and "new run directory" in msg

        bad_replay = replay_template_like(make_replay())
        bad_replay["image"] = bad_replay["image"].astype(np.float32)
        bad_replay["extra"] = np.zeros(3, np.int32)
        with pytest.raises(CheckpointMismatchError, match="image") as info:
            ck.restore(make_agent(1), bad_replay)
        assert "extra" in str(info.value)


def test_restore_without_checkpoint(tmp_path):
    with Checkpointer(tmp_path / "run") as ck:
        assert ck.latest_step() is None
        with pytest.raises(FileNotFoundError, match="No finalised checkpoint"):
            ck.restore(make_agent(0), None)


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(TypeError):
            ck.save(1, make_agent(0), None, {"arr": np.zeros(3)})
        with pytest.raises(TypeError):
            ck.save(1, make_agent(0), None, {1: "int key"})
        assert ck.latest_step() is None


def test_dict_state_zero_size_and_abstract_template(tmp_path):
    state = {
        "agent": perturb(make_agent(0), seed=2),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "counts": jnp.arange(3, dtype=jnp.int32),
        "none": None,
        "python_int": 7,
    }
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, {}, {}, wait=True)
        template = {**state, "agent": make_agent(1), "counts": jnp.zeros(3, jnp.int32)}
        got, replay, _, _ = ck.restore(template, {})
        assert replay == {}
        assert_trees_bit_equal(got, state)
        # An abstract template (no allocation) works too.
        abstract = eqx.filter_eval_shape(lambda: template)
        abstract = {**abstract, "python_int": 7}
        got2, _, _, _ = ck.restore(abstract, None)
        assert_trees_bit_equal(got2, state)


def test_replay_is_saved_without_a_copy(tmp_path):
    """A replay can fill most of the memory: saving it must not copy it (orbax's default deep-copies
    host arrays), and it is written uncompressed."""
    replay = {"image": np.random.default_rng(0).integers(0, 256, (2, 512, 64, 64, 3), dtype=np.uint8)}
    size = replay["image"].nbytes  # 12 MiB
    with Checkpointer(tmp_path) as ck:
        tracemalloc.start()  # numpy reports its buffers to tracemalloc
        try:
            ck.save(1, make_agent(0), replay, {})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size / 4, f"saving a {size}-byte replay allocated {peak} bytes"
        _, got, _, _ = ck.restore(make_agent(1), replay_template_like(replay))
    assert np.array_equal(got["image"], replay["image"])
    on_disk = sum(f.stat().st_size for f in (tmp_path / "1" / "replay").rglob("*") if f.is_file())
    zeros = {"image": np.zeros_like(replay["image"])}
    with Checkpointer(tmp_path / "zeros") as ck:
        ck.save(1, make_agent(0), zeros, {})
    zeros_on_disk = sum(f.stat().st_size for f in (tmp_path / "zeros" / "1" / "replay").rglob("*") if f.is_file())
    assert zeros_on_disk >= size and on_disk >= size  # not compressed


def test_older_checkpoints_with_a_whole_compressed_replay_restore(tmp_path, monkeypatch):
    """Checkpoints written before the replay was cut into pieces and saved uncompressed (orbax's
    default handler, whole arrays) restore, also into a replay buffer's storage."""
    monkeypatch.setattr(checkpoint_lib, "_PIECE_BYTES", 100)
    replay = make_replay(0)
    ring = np.random.default_rng(1).integers(0, 256, (2, 40, 3), dtype=np.uint8)
    replay["data/x"] = ring[:, :30]  # strided and over 100 bytes: cut, with today's format
    with monkeypatch.context() as old:
        old.setattr(checkpoint_lib, "_replay_handler", ocp.PyTreeCheckpointHandler)
        old.setattr(checkpoint_lib, "_cut_replay", lambda state: ({k: np.asarray(v) for k, v in state.items()}, {}))
        with Checkpointer(tmp_path) as ck:
            ck.save(1, make_agent(0), replay, {})
        zeros = {"image": np.zeros((2, 64, 64, 64, 3), np.uint8)}
        with Checkpointer(tmp_path / "compressed") as ck:
            ck.save(1, make_agent(0), zeros, {})
    compressed = sum(f.stat().st_size for f in (tmp_path / "compressed" / "1" / "replay").rglob("*") if f.is_file())
    assert compressed < zeros["image"].nbytes / 10  # the old handler did compress
    into = ReplayBuffer({"x": ((3,), np.uint8)}, 80, 2)
    with Checkpointer(tmp_path) as ck:
        assert "data/x" in ck._manager.item_metadata(1)["replay"].tree  # whole, as before
        agent, got, _, _ = ck.restore(make_agent(1), {**replay_template_like(replay),
                                                      "data/x": into.state_template(30)["data/x"]})
    assert_trees_bit_equal(agent, make_agent(0))
    assert_trees_bit_equal(got, {k: np.array(v) for k, v in replay.items()})
    assert np.shares_memory(got["data/x"], into.state_template(30)["data/x"])


def test_replay_is_cut_into_pieces_and_read_back_in_place(tmp_path, monkeypatch):
    """tensorstore copies a strided array whole when writing it and reads an array whole, so a big
    replay array is written in contiguous pieces: each row's runs of steps for the stored part of a ring
    (`[num_envs, stored, ...]`, strided), runs of whole rows for a contiguous array with small rows. A
    writeable template is filled in place, a bounded group of pieces at a time."""
    monkeypatch.setattr(checkpoint_lib, "_PIECE_BYTES", 100)
    rng = np.random.default_rng(0)
    ring = rng.integers(0, 256, (3, 50, 4), dtype=np.uint8)
    replay = {"data/x": ring[:, :30], "counter": np.array(6, np.int64), "small": ring[:2, :10],
              "data/big": rng.standard_normal((1, 20, 2)).astype(np.float32),
              "many_rows": rng.integers(0, 9, (40, 3), dtype=np.int64), "flat": np.arange(40.0)}
    with Checkpointer(tmp_path) as ck:
        ck.save(1, make_agent(0), replay, {})
        saved = set(ck._manager.item_metadata(1)["replay"].tree)
        # Over 100 bytes: x's rows (120 bytes) in runs of 25 steps (4 bytes each), big's one row in runs of
        # 12 steps (8 bytes each), many_rows' contiguous 24-byte rows in runs of 4. The rest is whole (small: 80 bytes).
        assert saved == {"data/x@0@0", "data/x@0@25", "data/x@1@0", "data/x@1@25", "data/x@2@0", "data/x@2@25",
                         "data/big@0@0", "data/big@0@12", *(f"many_rows@{r}@0" for r in range(0, 40, 4)),
                         "counter", "small", "flat"}
        assert ck.array_specs()["replay"] == {
            ("data/x",): ((3, 30, 4), "uint8"), ("counter",): ((), "int64"), ("small",): ((2, 10, 4), "uint8"),
            ("data/big",): ((1, 20, 2), "float32"), ("many_rows",): ((40, 3), "int64"), ("flat",): ((40,), "float64")}
        reads = []
        restore = ck._manager.restore

        def counting_restore(step, args):
            if "replay" in args:
                reads.append(sum(x.nbytes for x in args["replay"].item.values()))
            return restore(step, args=args)

        monkeypatch.setattr(ck._manager, "restore", counting_restore)
        into = ReplayBuffer({"x": ((4,), np.uint8)}, 150, 3)
        template = {**replay_template_like(replay), "data/x": into.state_template(30)["data/x"]}
        _, got, _, _ = ck.restore(make_agent(1), template)
        assert_trees_bit_equal(got, {k: np.array(v) for k, v in replay.items()})
        assert got["data/x"] is template["data/x"]
        into.load_state_dict({"data/x": got["data/x"], "counter/written": np.array(30)})  # already in place
        assert np.shares_memory(got["data/x"], into.state_dict()["data/x"])
        np.testing.assert_array_equal(into.state_dict()["data/x"], replay["data/x"])
        # Groups of arrays and pieces under 2 x 100 bytes, or one whole (1-D) array bigger than that.
        assert len(reads) > 3 and all(r < 200 or r == replay["flat"].nbytes for r in reads), reads
        with pytest.raises(CheckpointMismatchError, match=r"data/x: saved \(3, 30, 4\) uint8 vs expected \(3, 31, 4\)"):
            ck.restore(make_agent(1), {**replay_template_like(replay), "data/x": np.zeros((3, 31, 4), np.uint8)})
        with pytest.raises(ValueError, match="clashes"):
            ck.save(2, make_agent(0), {"a": ring[:, :30], "a@1@0": np.zeros(2)}, {})


def test_an_interrupted_save_finishes_writing_the_replay_before_it_raises(tmp_path, monkeypatch):
    """The replay is written from the caller's arrays: a Ctrl-C while `save` waits must not let the caller
    change them under orbax (the finished checkpoint would mix old and new data)."""
    replay = make_replay(0)
    expected = {k: v.copy() for k, v in replay.items()}
    with Checkpointer(tmp_path) as ck:
        real_wait, waits = ck.wait, []

        def interrupted_wait():
            waits.append(1)
            if len(waits) == 1:
                raise KeyboardInterrupt
            real_wait()

        monkeypatch.setattr(ck, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            ck.save(1, make_agent(0), replay, {})
        assert len(waits) == 2
        for v in replay.values():  # the caller's clean-up changes its buffer
            v[...] = np.zeros_like(v)
        monkeypatch.undo()
        _, got, _, _ = ck.restore(make_agent(1), replay_template_like(replay))
    assert_trees_bit_equal(got, expected)


def test_saving_the_stored_part_of_a_ring_adds_no_resident_memory(tmp_path, monkeypatch):
    """tensorstore copies an array it takes for strided (tracemalloc does not see that copy), so this
    measures resident memory while saving 48 MiB of a half-full ring, cut into 16 MiB pieces."""
    from experiments.bench import PeakRSS, rss_gib

    monkeypatch.setattr(checkpoint_lib, "_PIECE_BYTES", 16 << 20)
    ring = np.zeros((2, 2048, 96, 256), np.uint8)  # 2 envs x 2048 steps x 24 KiB
    ring[:, :1024] = np.random.default_rng(0).integers(0, 256, (2, 1024, 96, 256), dtype=np.uint8)
    replay = {"data/x": ring[:, :1024]}
    with Checkpointer(tmp_path) as ck:
        ck.save(1, make_agent(0), {"data/x": np.zeros((2, 8), np.uint8)}, {})  # orbax's first-save set-up
        before = rss_gib()
        with PeakRSS() as peak:
            ck.save(2, make_agent(0), replay, {})
        extra_mib = (peak.peak - before) * 1024
        assert extra_mib < 12, f"saving 48 MiB of replay added {extra_mib:.0f} MiB of resident memory"
        _, got, _, _ = ck.restore(make_agent(1), replay_template_like(replay))
    np.testing.assert_array_equal(got["data/x"], replay["data/x"])
