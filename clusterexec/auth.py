"""Where the shared key comes from, and the key file the master creates.

Order of precedence, the same for master, worker and client:

    1. the key given explicitly (`authkey=` / `--authkey`)
    2. the key file given explicitly (`--authkey-file`)
    3. the CLUSTEREXEC_AUTHKEY environment variable
    4. the default key file: $CLUSTEREXEC_AUTHKEY_FILE, else ~/.clusterexec/authkey

Only the master creates the default key file (owner-only permissions) when no key exists anywhere; on a
cluster with a shared home directory every worker and client then finds it without configuration.
The key itself is never printed or logged.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger("clusterexec.auth")

ENV_KEY = "CLUSTEREXEC_AUTHKEY"
ENV_KEY_FILE = "CLUSTEREXEC_AUTHKEY_FILE"


class MissingKeyError(RuntimeError):
    """No authentication key was given and no key file exists (exported as `clusterexec.MissingKeyError`)."""


def default_key_file() -> Path:
    env = os.environ.get(ENV_KEY_FILE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".clusterexec" / "authkey"


def _as_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is readable by other users; run: chmod 600 %s", path, path)
    key = path.read_bytes().strip()
    if not key:
        raise MissingKeyError(f"key file {path} is empty")
    return key


def create_key_file(path: Path) -> bytes:
    """Write a fresh random key readable by its owner only; returns it. Never overwrites a file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def resolve_key(authkey: str | bytes | None = None, key_file: str | os.PathLike | None = None,
                *, create: bool = False) -> tuple[bytes, str]:
    """The key to use and a description of where it came from (for messages, never the key itself)."""
    if authkey is not None:
        key = _as_bytes(authkey)
        if not key:
            raise MissingKeyError("the authentication key is empty")
        return key, "the given key"
    if key_file is not None:
        path = Path(key_file).expanduser()
        if not path.exists():
            if not create:
                raise MissingKeyError(f"key file {path} does not exist")
            create_key_file(path)
            log.info("created key file %s", path)
        return read_key_file(path), f"key file {path}"
    env = os.environ.get(ENV_KEY)
    if env:
        return _as_bytes(env), f"${ENV_KEY}"
    path = default_key_file()
    if path.exists():
        return read_key_file(path), f"key file {path}"
    if create:
        key = create_key_file(path)
        log.info("created key file %s", path)
        return key, f"key file {path} (new)"
    raise MissingKeyError(
        "no authentication key: pass authkey=... (or --authkey-file FILE), set "
        f"{ENV_KEY}, or copy the master's key file to {path} (the master creates it when it first starts)"
    )
