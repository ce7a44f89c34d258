"""Choose MuJoCo's offscreen OpenGL backend before MuJoCo or dm_control is imported.

dm_control picks its renderer once, when ``dm_control._render`` is first imported, from the
``MUJOCO_GL`` environment variable. On a machine without a display ``glfw`` fails, so
`ensure_mujoco_gl` sets ``MUJOCO_GL`` (unless the user already did) to the first backend that
can create a context: ``egl`` (Mesa's llvmpipe on a CPU, the GPU's driver elsewhere), then
``osmesa``. Each candidate is tried in a short subprocess, because a failed EGL import leaves
PyOpenGL bound to EGL in the process that tried it. The choice lands in ``os.environ``, so env
subprocesses (vector envs) inherit it without probing again.

Importing ``envs`` already sets ``MUJOCO_GL=egl`` provisionally (`default_mujoco_gl`), so that
code importing dm_control itself after ``import envs`` does not end up with glfw; the first
MuJoCo env built then checks the choice and falls back to osmesa if EGL does not work.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

__all__ = [
    "DEBIAN_PACKAGES",
    "RendererUnavailableError",
    "choose_backend",
    "default_mujoco_gl",
    "ensure_mujoco_gl",
    "import_mujoco_module",
]

# Backends tried in order, and the Debian packages each needs.
DEBIAN_PACKAGES: dict[str, str] = {
    "egl": "libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1",
    "osmesa": "libosmesa6",
}
# dm_control's names for "no renderer" (dm_control._render.constants.NO_RENDERER).
_DISABLED = ("off", "disable", "disabled", "false", "0")

# Creates and frees a tiny context with the backend named in MUJOCO_GL.
_PROBE = "import mujoco; c = mujoco.GLContext(8, 8); c.make_current(); c.free()"


# True while MUJOCO_GL holds the provisional default of `default_mujoco_gl`, not yet probed.
_provisional = False


class RendererUnavailableError(RuntimeError):
    """No OpenGL backend can render MuJoCo scenes in this process."""


def _install_hint() -> str:
    egl, osmesa = DEBIAN_PACKAGES["egl"], DEBIAN_PACKAGES["osmesa"]
    return (
        f"Install EGL with `apt-get install -y {egl}` (then MUJOCO_GL=egl), or OSMesa with "
        f"`apt-get install -y {osmesa}` (then MUJOCO_GL=osmesa)."
    )


def probe_backend(backend: str, timeout_s: float = 60.0) -> bool:
    """Whether MuJoCo can create an offscreen context with `backend` ('egl' or 'osmesa').

    Runs in a subprocess (about 0.3 s), so a failure leaves this process untouched.
    """
    env = dict(os.environ, MUJOCO_GL=backend)
    # mujoco's EGL/OSMesa contexts need PyOpenGL on the same platform; keep a user's own.
    env.setdefault("PYOPENGL_PLATFORM", backend)
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def choose_backend(
    candidates: Sequence[str] = ("egl", "osmesa"),
    probe: Callable[[str], bool] | None = None,
) -> str | None:
    """The first of `candidates` for which `probe(backend)` is true, or None.

    `probe` defaults to `probe_backend`, looked up at call time so tests can replace it.
    """
    probe = probe_backend if probe is None else probe
    for backend in candidates:
        if probe(backend):
            return backend
    return None


def default_mujoco_gl() -> None:
    """Set ``MUJOCO_GL=egl`` provisionally if neither the user nor dm_control has chosen.

    Cheap (no probe); `ensure_mujoco_gl` verifies the choice before the first MuJoCo env.
    """
    global _provisional
    if "MUJOCO_GL" not in os.environ and "dm_control._render" not in sys.modules:
        os.environ["MUJOCO_GL"] = "egl"
        _provisional = True


def ensure_mujoco_gl(need_rendering: bool = True) -> str:
    """Set ``MUJOCO_GL`` for this process (and its children) if the user has not.

    Call it before the first import of ``mujoco`` or ``dm_control``.

    Args:
      need_rendering: True for envs that render observations (DMC vision, Memory Maze). If False
        (DMC proprio) and no backend works, rendering is switched off (``MUJOCO_GL=disable``) with
        a warning instead of an error, since the env never renders.

    Returns:
      The backend in use: 'egl', 'osmesa', a user's own choice, or 'disable'.

    Raises:
      RendererUnavailableError: rendering is needed but no backend works, or ``MUJOCO_GL``
        switches rendering off. The message names the Debian packages to install.
    """
    global _provisional
    render_module = sys.modules.get("dm_control._render")
    if render_module is not None:
        # dm_control already chose; the variable can no longer change it.
        backend = str(getattr(render_module, "BACKEND", None) or "")
    elif "MUJOCO_GL" in os.environ and not _provisional:
        backend = os.environ["MUJOCO_GL"]
    else:
        chosen = choose_backend()
        if chosen is not None:
            os.environ["MUJOCO_GL"] = chosen
            _provisional = False
            backend = chosen
        elif need_rendering:
            raise RendererUnavailableError(
                "MuJoCo cannot render offscreen: neither EGL nor OSMesa can create an OpenGL "
                "context here. " + _install_hint()
            )
        else:
            warnings.warn(
                "No OpenGL backend works, so MuJoCo rendering is switched off "
                "(MUJOCO_GL=disable); envs without images still run. " + _install_hint(),
                stacklevel=2,
            )
            os.environ["MUJOCO_GL"] = "disable"
            _provisional = False
            backend = "disable"
    if need_rendering and backend.lower() in _DISABLED + ("",):
        raise RendererUnavailableError(
            f"This env renders images but MuJoCo rendering is off (MUJOCO_GL={backend!r}, set "
            "before dm_control was imported). Unset MUJOCO_GL or set it to egl or osmesa in a new "
            "process. " + _install_hint()
        )
    return backend


def import_mujoco_module(module: str, extra: str, need_rendering: bool = True) -> ModuleType:
    """Import a module of a MuJoCo-based package after choosing the renderer.

    Args:
      module: e.g. ``'dm_control.suite'`` or ``'memory_maze.tasks'``.
      extra: the ``worldmodels`` pip extra that installs it (named in the error).
      need_rendering: passed to `ensure_mujoco_gl`.

    Returns:
      The imported module.

    Raises:
      ModuleNotFoundError: the package is not installed (names the pip extra).
      RendererUnavailableError: the import failed in the OpenGL layer.
    """
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"{package} is not installed; install it with `pip install 'worldmodels[{extra}]'`.",
            name=package,
        )
    backend = ensure_mujoco_gl(need_rendering)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise  # A missing dependency of the package itself: its own message is clearest.
    except (ImportError, RuntimeError, AttributeError) as err:
        # dm_control imports its renderer at import time; a broken GL stack fails here.
        raise RendererUnavailableError(
            f"Importing {module} failed while loading MuJoCo's OpenGL backend "
            f"MUJOCO_GL={backend!r}: {err!r}. " + _install_hint()
        ) from err


default_mujoco_gl()
