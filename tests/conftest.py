"""Shared test set-up."""

import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """With `-n N` (`--dist loadgroup`, see pyproject.toml), each module is one group: it runs on one
    worker, in order, so its module fixtures and compiled programs are built once. The tests of a
    module that sets `SPREAD_OVER_WORKERS = True` (each runs its own processes, sharing nothing) go
    one by one to whichever worker is free, but for those it marks with an `xdist_group` of their
    own (e.g. those sharing a module fixture). The lone tests run first: they are the longest, and
    the groups that follow even out the workers' ends."""
    alone = []
    for item in items:
        module = getattr(item, "module", None)
        spread = getattr(module, "SPREAD_OVER_WORKERS", False)
        if not spread:
            item.add_marker(pytest.mark.xdist_group(getattr(module, "__name__", item.nodeid.split("::")[0])))
        alone.append(spread and item.get_closest_marker("xdist_group") is None)
    items[:] = [item for item, a in zip(items, alone) if a] + [item for item, a in zip(items, alone) if not a]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. XLA's CPU executables keep their code in
    memory mappings, and the whole suite's programs would pass the kernel's limit of 65,530 mappings
    per process (vm.max_map_count), after which XLA crashes mid-compile."""
    yield
    jax.clear_caches()
    gc.collect()


# The signing key for the run dirs the tests write (worldmodels.signing): a temporary one, not the
# user's; set at import so that the tests' subprocesses use it too.
os.environ.setdefault("WORLDMODELS_SIGNING_KEY", str(Path(tempfile.mkdtemp(prefix="wm-test-key-")) / "signing_key"))

# One persistent compile cache per pytest worker (JAX writes its entries in place, so workers do not
# share one), not the user's: a module that compiles a program another module on this worker compiled
# before (the debug agent on catch, say) loads it instead of compiling it again after
# `_release_compiled_programs`; the worker's `experiments.train` subprocesses and notebook kernels use
# it too (one at a time: the worker waits for them).
COMPILE_CACHE = tempfile.mkdtemp(prefix="wm-test-xla-")
atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ["WORLDMODELS_COMPILE_CACHE"] = COMPILE_CACHE
