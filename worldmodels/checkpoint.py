"""Resumable checkpoints of a training run, built on orbax.

A checkpoint at step ``N`` is one orbax step directory ``<directory>/N`` with
four items:

``agent``
    The array leaves of the agent state (``eqx.filter(state, eqx.is_array)``)
    saved with ``StandardSave``.  New-style typed PRNG keys are stored as their
    raw ``key_data`` and re-wrapped on restore with the template's key impl.
``replay``
    The replay buffer, a flat ``dict[str, np.ndarray]`` (``PyTreeSave``,
    uncompressed; restored as numpy arrays with the saved dtypes, int64
    included).  Arrays over 64 MiB are written as pieces of about that size
    (see ``_cut_replay``).
``blobs``
    Named raw bytes, stored as uint8 arrays under the keys ``b0``, ``b1``, ...
``meta``
    A JSON document (``JsonSave``) holding the caller's ``meta`` plus the
    bookkeeping needed to restore (blob names and lengths, zero-size arrays,
    which items were saved).

orbax cannot write zero-size arrays, so those (and empty blobs) are recorded
in ``meta`` and rebuilt on restore; an item with nothing left to write is not
written at all.

Without a replay, a save is asynchronous: orbax copies the agent state and blobs
to host memory and writes the files in a background thread.  The replay, which can be
the biggest thing in the process, is written straight from the caller's arrays
and uncompressed, so saving needs no second copy of it; :meth:`Checkpointer.save`
returns once it is written.  A restore can likewise fill the replay buffer's own
memory in place.  (``python -m experiments.bench --checkpoint 1.15``: 1.15 GiB of
stored images save with +0.01 GiB of memory and restore with +0.06 GiB, where
orbax's copy and compression needed +2.3 GiB.)
orbax writes each step into ``<N>.orbax-checkpoint-tmp-*`` and renames it to ``<N>``
only when complete, so a crash mid-save leaves no step directory behind;
:meth:`Checkpointer.latest_step` only reports finalised steps.

Before restoring, the template's array paths, shapes and dtypes are compared
with orbax's saved metadata; a difference raises
:class:`CheckpointMismatchError` naming the differing leaves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import absl.logging
import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointMismatchError", "ProcessShardCheckpointer"]

# orbax logs every save/restore step at INFO through absl; keep warnings and
# errors.
absl.logging.set_verbosity(absl.logging.WARNING)

_log = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_ARRAY_ITEMS = ("agent", "replay", "blobs")
_COMMIT_FILE = "commit_success.txt"
_MAX_LISTED = 8
_FIX_HINT = (
    "This run directory holds a checkpoint of a different config: resume with "
    "the config saved in the run directory, or start a new run directory."
)


def _replay_handler() -> ocp.PyTreeCheckpointHandler:
    """The replay item's handler: numpy arrays written from the caller's memory without orbax's
    deep copy (the caller must wait for the write), and without compression, which is slow on
    images and latents and holds a compressed copy in memory while writing."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        # Unused (replay values are numpy); without it orbax warns on every Checkpointer.
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)


# A replay array bigger than this is written and read in pieces of about this size.
_PIECE_BYTES = 64 << 20


def _pieces(shape: tuple[int, ...], rows_per_piece: int, steps_per_piece: int):
    """``(name suffix, index)`` of each piece of an array ``[rows, steps, ...]``: runs of whole rows, or
    (with one row per piece) runs of one row's steps, indexed without the row axis: tensorstore takes a
    leading axis of size 1 with a row's stride for a strided array, and copies it."""
    rows, steps = shape[0], shape[1]
    if rows_per_piece > 1:
        return [(f"@{r}@0", (slice(r, r + rows_per_piece),)) for r in range(0, rows, rows_per_piece)]
    return [(f"@{r}@{s}", np.s_[r, s:s + steps_per_piece]) for r in range(rows) for s in range(0, steps, steps_per_piece)]


def _piece_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    sizes = [len(range(*i.indices(n))) for i, n in zip(index, shape) if isinstance(i, slice)]
    return (*sizes, *shape[len(index):])


def _cut_replay(replay_state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """The replay's arrays as orbax can write them from the caller's memory and read them back a
    bounded piece at a time.

    tensorstore writes a C-contiguous array without copying it but copies a strided one whole, and
    reads an array whole. So an array ``[rows, steps, ...]`` bigger than ``_PIECE_BYTES`` whose rows
    are contiguous (as the stored part of a ring, ``[num_envs, stored, ...]``, is) is cut into
    contiguous pieces of about that size (at least one step of one row): runs of whole rows if the
    array is contiguous and its rows small, else runs of each row's steps. A piece is named
    ``"<key>@<first row>@<first step>"``. Smaller arrays are written whole (a strided one copied),
    and so are 1-D arrays and arrays with strided rows. Returns the arrays to write and ``{key:
    [shape, dtype, rows per piece, steps per piece]}`` of those cut.
    """
    arrays, cut = {}, {}

    def put(name: str, value: np.ndarray) -> None:
        if name in arrays:
            raise ValueError(f"replay_state key {name!r} clashes with a piece of a cut array; rename it")
        arrays[name] = value

    for k, v in replay_state.items():
        if not isinstance(k, str):
            raise TypeError(f"replay_state key {k!r} is not a str")
        v = np.asarray(v)
        if v.ndim < 2 or v.nbytes <= _PIECE_BYTES or not v[0].flags.c_contiguous:
            put(k, v)
            continue
        row_bytes, step_bytes = v[0].nbytes, v[0, 0].nbytes
        if v.flags.c_contiguous and 0 < row_bytes <= _PIECE_BYTES:
            rows, steps = _PIECE_BYTES // row_bytes, v.shape[1]
        else:
            rows, steps = 1, max(1, _PIECE_BYTES // max(step_bytes, 1))
        cut[k] = [list(v.shape), _dtype_str(v.dtype), rows, steps]
        for suffix, index in _pieces(v.shape, rows, steps):
            put(k + suffix, v[index])
    return arrays, cut


class CheckpointMismatchError(ValueError):
    """The template does not match what the checkpoint holds."""


# --------------------------------------------------------------------------
# pytree helpers


def _is_array_like(x: Any) -> bool:
    """Array leaves of an agent state; abstract (ShapeDtypeStruct) leaves too."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_to_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _path(keypath) -> tuple[str, ...]:
    return tuple(_key_to_str(k) for k in keypath)


def _fmt_path(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<root>"


def _dtype_str(dtype: Any) -> str:
    return str(np.dtype(dtype))


def _spec(x: Any) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in x.shape), _dtype_str(x.dtype)


def _fmt_spec(spec: tuple[tuple[int, ...], str]) -> str:
    return f"{spec[0]} {spec[1]}"


def _flat_specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` of the array leaves of ``tree`` (None = no leaf)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path(p): _spec(x) for p, x in leaves}


def _drop_zero_size(tree: Any) -> tuple[Any, list]:
    """Replace zero-size arrays (which orbax refuses to write) by None.

    Returns the new tree and ``[[path, shape, dtype], ...]`` of what was dropped.
    """
    dropped = []

    def f(keypath, x):
        if x is not None and int(np.prod(x.shape)) == 0:
            shape, dtype = _spec(x)
            dropped.append([list(_path(keypath)), list(shape), dtype])
            return None
        return x

    return jax.tree_util.tree_map_with_path(f, tree), dropped


def _has_leaves(tree: Any) -> bool:
    return len(jax.tree_util.tree_leaves(tree)) > 0


def _to_jsonable(x: Any, where: str = "meta") -> Any:
    """Checks that ``x`` round-trips through JSON; converts numpy scalars.

    Python ints of any size (e.g. ``np.random.Generator.bit_generator.state``)
    round-trip exactly through Python's json module, which JsonSave uses.
    """
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where}: dict key {k!r} is not a str; JSON would turn it "
                    "into one and it would not round trip"
                )
            out[k] = _to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise TypeError(
        f"{where}: {type(x).__name__} is not JSON-able; put arrays in "
        "replay_state and opaque objects in blobs"
    )


# --------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores a training run: agent state + replay + metadata, resumable.

    Args:
        directory: the run's checkpoint directory (created if missing).
        max_to_keep: how many of the most recent checkpoints to keep.
        this_process_only: in a multi-process run, this process alone saves and restores here (no
            barriers with the others; its agent state must then be numpy or its own device's arrays).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, this_process_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self._name_format = ocp.path.step.standard_name_format()
        multiprocessing = ocp.options.MultiprocessingOptions()
        if this_process_only:
            me = jax.process_index()
            multiprocessing = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}")
            os.makedirs(self.directory, exist_ok=True)  # orbax refuses create=True with active_processes
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not this_process_only,
            # Remove `<step>.orbax-checkpoint-tmp-*` left by a crashed save.
            cleanup_tmp_directories=True,
            step_name_format=self._name_format,
            multiprocessing_options=multiprocessing,
        )
        # Registering the handlers up front lets a fresh process read the
        # metadata of every item before its first restore.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "agent": ocp.StandardCheckpointHandler(),
                "replay": _replay_handler(),
                "blobs": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    def wait(self) -> None:
        """Blocks until every pending save is written and finalised."""
        if not self._closed:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's resources."""
        if self._closed:
            return
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()
            self._closed = True

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.directory} is closed")

    # -- steps -------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalised steps on disk, ascending (a save in flight is not included)."""
        if not os.path.isdir(self.directory):
            return []
        steps = []
        for m in self._name_format.find_all(self.directory):
            # find_all already skips `*.orbax-checkpoint-tmp-*`; orbax writes
            # the commit file just before the final rename, so also require it
            # (guards against half-deleted old steps).
            if os.path.exists(os.path.join(os.fspath(m.path), _COMMIT_FILE)):
                steps.append(int(m.step))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The last finalised step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save --------------------------------------------------------------

    def save(
        self,
        step: int,
        agent_state: Any,
        replay_state: dict[str, np.ndarray] | None,
        meta: dict,
        blobs: dict[str, bytes] | None = None,
        wait: bool = False,
    ) -> None:
        """Saves a checkpoint at ``step``: asynchronously unless ``wait``, or a
        replay is given, which is written before this returns.

        The caller may modify ``replay_state``'s arrays and the agent state as
        soon as this returns.  Saving a step that already exists is skipped with
        a warning.
        """
        self._check_open()
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step in self._manager.all_steps():
            _log.warning(
                "checkpoint step %d already exists in %s; not saving it again",
                step,
                self.directory,
            )
            if wait:
                self.wait()
            return
        latest = self._manager.latest_step()
        if latest is not None and step < latest:
            _log.warning(
                "saving step %d below the latest checkpoint step %d in %s; "
                "restore() without a step will still pick step %d",
                step,
                latest,
                self.directory,
                latest,
            )

        # Validate everything before orbax starts its background work.
        user_meta = _to_jsonable(meta)
        info: dict[str, Any] = {
            "format_version": _FORMAT_VERSION,
            "replay_saved": replay_state is not None,
            "zero_size": {},
            "blobs": [],
        }
        trees: dict[str, Any] = {}

        # agent: array leaves only; typed keys as raw key data.
        arrays = eqx.filter(agent_state, eqx.is_array)
        arrays = jax.tree.map(
            lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, arrays
        )
        trees["agent"] = arrays

        if replay_state is not None:
            trees["replay"], info["replay_cut"] = _cut_replay(replay_state)

        blob_arrays = {}
        for i, (name, data) in enumerate((blobs or {}).items()):
            if not isinstance(name, str):
                raise TypeError(f"blob name {name!r} is not a str")
            data = bytes(data)
            info["blobs"].append([name, len(data)])
            blob_arrays[f"b{i}"] = np.frombuffer(data, dtype=np.uint8).copy()
        trees["blobs"] = blob_arrays

        items: dict[str, Any] = {}
        saved_items = []
        for name, tree in trees.items():
            tree, dropped = _drop_zero_size(tree)
            if dropped:
                info["zero_size"][name] = dropped
            if _has_leaves(tree):
                save = ocp.args.PyTreeSave if name == "replay" else ocp.args.StandardSave
                items[name] = save(tree)
                saved_items.append(name)
        info["items"] = saved_items

        document = {"checkpointer": info, "user": user_meta}
        json.dumps(document)  # fail here, not in orbax's background thread
        items["meta"] = ocp.args.JsonSave(document)

        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not saved:  # should not happen with force=True
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")
        if wait or "replay" in saved_items:
            try:
                self.wait()
            except BaseException:
                # orbax goes on writing the replay from the caller's arrays: they must not change
                # before it is done, or the finished checkpoint would mix old and new data.
                self.wait()
                raise

    # -- restore -----------------------------------------------------------

    def _read_document(self, step: int | None) -> tuple[int, dict]:
        """(the step, latest if None; its JSON document {"checkpointer": ..., "user": ...})."""
        self._check_open()
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"No finalised checkpoint found in {self.directory}; "
                    "nothing to restore (start a new run, or point to the right "
                    "run directory)."
                )
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No finalised checkpoint for step {step} in {self.directory}; "
                f"available steps: {steps or 'none'}."
            )
        document = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]
        return step, document

    def read_meta(self, step: int | None = None) -> dict:
        """The user metadata of a checkpoint (latest if `step` is None), without reading any array."""
        return self._read_document(step)[1]["user"]

    def array_specs(self, step: int | None = None) -> dict[str, dict[tuple[str, ...], tuple[tuple[int, ...], str]]]:
        """What a checkpoint (latest if `step` is None) holds, without reading any array: per item
        (``"agent"``, ``"replay"``, ``"blobs"``), ``{leaf path: (shape, dtype)}``."""
        step, document = self._read_document(step)
        return self._array_specs(step, document["checkpointer"])

    def _array_specs(self, step: int, info: dict) -> dict[str, dict]:
        saved_items = set(info["items"])
        item_meta = self._manager.item_metadata(step)
        specs = {}
        for name in _ARRAY_ITEMS:
            specs[name] = {tuple(p): (tuple(s), d) for p, s, d in info["zero_size"].get(name, [])}
            if name in saved_items:
                md = item_meta[name] if name in item_meta else None
                if md is None:
                    raise CheckpointMismatchError(
                        f"Checkpoint step {step} in {self.directory}: orbax "
                        f"metadata of item {name!r} is missing or unreadable."
                    )
                specs[name].update(_flat_specs(getattr(md, "tree", md)))
        for key, (shape, dtype, rows, steps) in info.get("replay_cut", {}).items():  # report cut arrays whole
            missing = []
            for suffix, index in _pieces(tuple(shape), rows, steps):
                piece = specs["replay"].pop((key + suffix,), None)
                if piece != (_piece_shape(tuple(shape), index), dtype):
                    missing.append(key + suffix)
            if missing:
                raise CheckpointMismatchError(
                    f"Checkpoint step {step} in {self.directory}: replay array {key!r} is missing "
                    f"pieces or holds other shapes ({', '.join(missing[:_MAX_LISTED])}); it is damaged."
                )
            specs["replay"][(key,)] = (tuple(shape), dtype)
        return specs

    def restore(
        self,
        agent_template: Any,
        replay_template: dict[str, np.ndarray] | None,
        step: int | None = None,
    ) -> tuple[Any, dict[str, np.ndarray] | None, dict, dict[str, bytes]]:
        """Restores ``(agent_state, replay_state, meta, blobs)``.

        ``agent_template`` gives the PyTree structure, static fields, shapes,
        dtypes and shardings (e.g. a freshly initialised agent state; its array
        leaves may also be ``jax.ShapeDtypeStruct``).  ``replay_template`` gives
        the replay keys, shapes and dtypes (numpy arrays or anything with
        ``.shape``/``.dtype``); pass None to skip restoring the replay, which is
        then returned as None (as it is when the checkpoint holds none).  A
        writeable numpy array in ``replay_template`` is filled in place and
        returned (e.g. views of the replay buffer's storage: a big replay is then
        never held twice when it was saved in pieces; see ``_cut_replay``).

        Raises:
            FileNotFoundError: there is no (such) finalised checkpoint.
            CheckpointMismatchError: the templates do not match the checkpoint.
        """
        step, document = self._read_document(step)
        info = document["checkpointer"]
        if info.get("format_version") != _FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self.directory} has format version "
                f"{info.get('format_version')!r}, expected {_FORMAT_VERSION}."
            )
        saved_items = set(info["items"])
        zero_size = {
            name: {tuple(p): (tuple(s), d) for p, s, d in entries}
            for name, entries in info["zero_size"].items()
        }
        specs = self._array_specs(step, info)

        args: dict[str, Any] = {}

        # agent
        arrays, static = eqx.partition(agent_template, _is_array_like)
        typed = jax.tree.map(_is_typed_key, arrays)
        raw = jax.tree.map(
            lambda x: jax.random.key_data(x)
            if _is_typed_key(x) and isinstance(x, jax.Array)
            else x,
            arrays,
        )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, raw)
        self._check_match(step, "agent state", specs["agent"], _flat_specs(abstract))
        agent_zero = zero_size.get("agent", {})
        abstract_saved = jax.tree_util.tree_map_with_path(
            lambda p, x: None if _path(p) in agent_zero else x, abstract
        )
        if "agent" in saved_items:
            args["agent"] = ocp.args.StandardRestore(abstract_saved)

        # replay
        restore_replay = replay_template is not None and info["replay_saved"]
        if restore_replay:
            replay_specs = {}
            for k, v in replay_template.items():
                replay_specs[(str(k),)] = _spec(v)
            self._check_match(step, "replay state", specs["replay"], replay_specs)
            replay_zero = zero_size.get("replay", {})

        # blobs
        if "blobs" in saved_items:
            target = {
                f"b{i}": np.empty((length,), np.uint8) if length else None
                for i, (_, length) in enumerate(info["blobs"])
            }
            args["blobs"] = ocp.args.StandardRestore(target)

        restored = (
            self._manager.restore(step, args=ocp.args.Composite(**args)) if args else {}
        )

        # agent: re-wrap typed keys, rebuild zero-size leaves, add static part.
        restored_arrays = restored["agent"] if "agent" in args else abstract_saved

        def finish(p, tmpl, got, is_typed):
            path = _path(p)
            if path in agent_zero:
                sharding = getattr(tmpl, "sharding", None)
                shape, dtype = agent_zero[path]
                got = jax.numpy.zeros(shape, dtype, device=sharding)
            if is_typed:
                got = jax.random.wrap_key_data(got, impl=jax.random.key_impl(tmpl))
            return got

        arrays_out = jax.tree_util.tree_map_with_path(
            finish, arrays, _fill_none(restored_arrays, arrays), typed
        )
        agent_state = eqx.combine(arrays_out, static)

        replay_out = None
        if restore_replay:
            replay_out = {}
            for k, v in replay_template.items():
                fill = isinstance(v, np.ndarray) and v.flags.writeable and v.size
                replay_out[k] = v if fill else np.zeros(*_spec(v))
            # Zero-size arrays were not written; the rest is read into replay_out a group at a time.
            written = {str(k): out for k, out in replay_out.items() if (str(k),) not in replay_zero}
            if "replay" in saved_items:
                self._read_replay(step, written, info.get("replay_cut", {}))

        blobs_out = {}
        got_blobs = restored["blobs"] if "blobs" in args else {}
        for i, (name, length) in enumerate(info["blobs"]):
            data = np.asarray(got_blobs[f"b{i}"]).tobytes() if length else b""
            if len(data) != length:
                raise CheckpointMismatchError(
                    f"Checkpoint step {step} in {self.directory}: blob {name!r} "
                    f"has {len(data)} bytes, expected {length}."
                )
            blobs_out[name] = data

        return agent_state, replay_out, document["user"], blobs_out

    def _read_replay(self, step: int, out: dict[str, np.ndarray], cut: dict[str, list]) -> None:
        """Reads the replay arrays into ``out``, whole or (those in ``cut``) piece by piece, in groups
        of up to ~2 x ``_PIECE_BYTES`` (or one array bigger than that, in older checkpoints)."""
        parts = []  # (name on disk, where it goes)
        for key, dest in out.items():
            if key in cut:
                shape, _, rows, steps = cut[key]
                parts += [(key + suffix, dest[index]) for suffix, index in _pieces(tuple(shape), rows, steps)]
            else:
                parts.append((key, dest))
        group, group_bytes = {}, 0
        for i, (name, dest) in enumerate(parts):
            group[name] = dest
            group_bytes += dest.nbytes
            if group_bytes >= _PIECE_BYTES or i == len(parts) - 1:
                targets = {n: np.empty(d.shape, d.dtype) for n, d in group.items()}
                got = self._manager.restore(step, args=ocp.args.Composite(replay=_partial_restore(targets)))
                for n, d in group.items():
                    np.copyto(d, got["replay"].pop(n))
                group, group_bytes = {}, 0

    def _check_match(self, step: int, what: str, saved: dict, expected: dict) -> None:
        problems = []
        for path, spec in expected.items():
            if path not in saved:
                problems.append(
                    f"  {_fmt_path(path)}: not in checkpoint "
                    f"(expected {_fmt_spec(spec)})"
                )
            elif saved[path] != spec:
                problems.append(
                    f"  {_fmt_path(path)}: saved {_fmt_spec(saved[path])} vs "
                    f"expected {_fmt_spec(spec)}"
                )
        for path, spec in saved.items():
            if path not in expected:
                problems.append(
                    f"  {_fmt_path(path)}: saved {_fmt_spec(spec)} but not in "
                    "the template"
                )
        if problems:
            listed = problems[:_MAX_LISTED]
            if len(problems) > _MAX_LISTED:
                listed.append(f"  ... and {len(problems) - _MAX_LISTED} more")
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self.directory} does not match the "
                f"expected {what} ({len(problems)} differing leaves):\n"
                + "\n".join(listed)
                + "\n"
                + _FIX_HINT
            )


class ProcessShardCheckpointer:
    """What one process other than process 0 owns in a multi-process run, checkpointed beside process
    0's `Checkpointer`: its replay shard, its policy carry and loop state, its envs' blob.

    orbax writes numpy arrays from process 0 only, so this process's host data cannot go through it
    (the replicated agent state goes once, in process 0's orbax checkpoint). A step is the directory
    `<directory>/<step>` holding `arrays.npz` (uncompressed) and `meta.json`; it is written as
    `<step>.tmp` and renamed when complete, so a crash mid-save leaves no step behind. Same methods
    and arguments as `Checkpointer` (the agent item: array leaves only).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # a save that crashed
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def wait(self) -> None:
        """Saves are synchronous."""

    def close(self) -> None:
        """Nothing to release: no background writer, no open files between calls."""

    def all_steps(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and os.path.exists(os.path.join(self.directory, n, "meta.json")))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        with open(os.path.join(self.directory, str(step), "meta.json")) as f:
            return json.load(f)["user"]

    def save(self, step: int, agent_state: Any, replay_state: dict[str, np.ndarray] | None, meta: dict,
             blobs: dict[str, bytes] | None = None, wait: bool = False) -> None:
        step = int(step)
        if step in self.all_steps():
            _log.warning("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return
        leaves = jax.device_get(jax.tree.leaves(eqx.filter(agent_state, eqx.is_array)))
        arrays = {f"agent/{i}": np.asarray(x) for i, x in enumerate(leaves)}
        arrays.update({f"replay/{k}": np.asarray(v) for k, v in (replay_state or {}).items()})
        arrays.update({f"blob/{k}": np.frombuffer(bytes(v), np.uint8) for k, v in (blobs or {}).items()})
        document = {"user": _to_jsonable(meta), "replay_saved": replay_state is not None}
        final = os.path.join(self.directory, str(step))
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "arrays.npz"), "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(document, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for old in self.all_steps()[:-self.max_to_keep]:
            shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)

    def restore(self, agent_template: Any, replay_template: dict[str, np.ndarray] | None,
                step: int | None = None) -> tuple[Any, dict[str, np.ndarray] | None, dict, dict[str, bytes]]:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no finalised checkpoint step {step} in {self.directory}")
        where = os.path.join(self.directory, str(step))
        with open(os.path.join(where, "meta.json")) as f:
            document = json.load(f)
        with np.load(os.path.join(where, "arrays.npz")) as saved:
            saved = {k: saved[k] for k in saved.files}
        arrays, static = eqx.partition(agent_template, eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        expected = {(f"agent/{i}",): _spec(x) for i, x in enumerate(leaves)}
        self._check_match(step, "agent state", {(k,): _spec(v) for k, v in saved.items() if k.startswith("agent/")},
                          expected)
        restored = [jax.numpy.asarray(saved[f"agent/{i}"]) for i in range(len(leaves))]
        agent_state = eqx.combine(jax.tree.unflatten(treedef, restored), static)
        replay_out = None
        if replay_template is not None and document["replay_saved"]:
            got = {(k[len("replay/"):],): _spec(v) for k, v in saved.items() if k.startswith("replay/")}
            self._check_match(step, "replay state", got, {(str(k),): _spec(v) for k, v in replay_template.items()})
            replay_out = {}
            for k, v in replay_template.items():
                if isinstance(v, np.ndarray) and v.flags.writeable and v.size:
                    v[...] = saved[f"replay/{k}"]
                    replay_out[k] = v
                else:
                    replay_out[k] = saved[f"replay/{k}"]
        blobs = {k[len("blob/"):]: v.tobytes() for k, v in saved.items() if k.startswith("blob/")}
        return agent_state, replay_out, document["user"], blobs

    _check_match = Checkpointer._check_match  # the same report of the differing leaves


def _partial_restore(target: dict[str, np.ndarray]) -> ocp.args.PyTreeRestore:
    """Reads the replay arrays named in ``target`` (with its shapes and dtypes), and no others."""
    return ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )


def _fill_none(restored: Any, like: Any) -> Any:
    """``restored`` aligned leaf-for-leaf with ``like``.

    ``restored`` has ``like``'s structure except that zero-size leaves (not
    written) are None; treating None as a leaf keeps them in place.
    """
    return jax.tree.map(
        lambda _, r: r, like, restored, is_leaf=lambda x: x is None
    )
