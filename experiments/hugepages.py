"""Back XLA's large CPU buffers with transparent huge pages (the scripts call this before importing jax).

XLA's CPU runtime allocates every train step's temporaries afresh with malloc. Blocks that large are
mmap'ed and unmapped again by glibc each time, so every step touches new 4 KiB pages: for size1m
that is ~100k page faults and about a third of the step's time on 2 cores. glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages instead (~500 faults
per step). Tunables are read when the process starts, hence the re-exec.

Opt out with `WORLDMODELS_HUGEPAGES=0`. In a notebook or your own script, start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment to get the same effect.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set, unless it is already set, the
    user opted out, or this is not Linux. Call it first thing in a script's `__main__` path."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or os.environ.get("WORLDMODELS_HUGEPAGES") == "0" or TUNABLE in tunables:
        return
    # Other glibcs (musl) and glibc < 2.35 ignore the variable; it is set, so this runs once.
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
