"""Signatures that let a resume tell this user's own pickles from anyone else's.

A host-loop checkpoint stores the environments' state as a pickle (so a resume continues their
episodes exactly), and unpickling runs code. A run directory downloaded from someone else must be
safe to open, so the loop signs each pickle with an HMAC-SHA256 (Python's `hmac`) under a secret key
that lives outside run directories: ``$WORLDMODELS_SIGNING_KEY`` (a file path) or else
``$XDG_CONFIG_HOME/worldmodels/signing_key`` (``~/.config/...``), made with 32 random bytes and mode
0600 on first use. A resume unpickles only what this key signed; anything else is left unread (the
envs restart their episodes) unless the user passes ``--run.trust-env-pickle`` for a run of their own
written under another key (another machine without a shared home, a deleted key). `load`,
`experiments.evaluate` and the device loop never unpickle anything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["key_path", "sign", "verify"]


def key_path() -> Path:
    """Where this user's signing key is (it may not exist yet)."""
    if os.environ.get("WORLDMODELS_SIGNING_KEY"):
        return Path(os.environ["WORLDMODELS_SIGNING_KEY"]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "worldmodels" / "signing_key"


def _key(create: bool) -> bytes | None:
    path = key_path()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: two processes creating it at once agree on the first one's key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def sign(data: bytes) -> str | None:
    """The hex HMAC-SHA256 of `data` under this user's key (made if missing); None when no key can be
    read or written (e.g. a read-only home), and the pickle then goes unsigned."""
    try:
        key = _key(create=True)
    except OSError:
        return None
    return hmac.new(key, data, hashlib.sha256).hexdigest() if key else None


def verify(data: bytes, signature: str | None) -> bool:
    """Whether `signature` is this user's key's signature of `data` (False without a key or signature)."""
    try:
        key = _key(create=False)
    except OSError:
        return False
    if not key or not signature:
        return False
    return hmac.compare_digest(hmac.new(key, data, hashlib.sha256).hexdigest(), signature)
