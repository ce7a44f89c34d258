"""The scripts' re-exec with glibc's malloc huge-page tunable (experiments/hugepages.py)."""

import os
import subprocess
import sys

import pytest

CODE = ("import os, sys; from experiments.hugepages import reexec_with_huge_pages; "
        "print('start', flush=True); reexec_with_huge_pages(); "
        "print(os.environ.get('GLIBC_TUNABLES', '')); print(sys.argv[1:])")


def run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "WORLDMODELS_HUGEPAGES")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CODE, "a", "--b"], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return out.stdout.splitlines()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_reexec_sets_the_tunable_once_and_keeps_arguments_and_other_tunables():
    lines = run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    # "start" twice: the process ran again (once, not in a loop), with the same arguments.
    assert lines == ["start", "start", "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", "['a', '--b']"]


def test_opt_out_and_already_set_do_not_reexec():
    assert run({"WORLDMODELS_HUGEPAGES": "0"}) == ["start", "", "['a', '--b']"]
    assert run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == ["start", "glibc.malloc.hugetlb=0", "['a', '--b']"]
