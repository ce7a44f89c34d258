"""Shared test set-up."""

import gc
import os
import tempfile
from pathlib import Path

import jax
import pytest


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
