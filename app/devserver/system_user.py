"""Running a server as a system user when we are root (PostgreSQL refuses to run as root).

As root, PostgreSQL runs as the system user ``embedded_postgres`` (created when missing); we
widen permissions just enough for that user: ``o+x`` on the directories above its data
directory, ``o+r`` (``o+rx``) on the wheel's files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from app.devserver.process import RunAs
from app.devserver.server import EmbeddedServerError

log = logging.getLogger(__name__)


def add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        log.info("chmod %o -> %o: %s", mode & 0o7777, (mode | bits) & 0o7777, path)
        path.chmod(mode | bits)


def make_traversable(path: Path) -> None:
    for directory in (path, *path.parents):
        add_mode(directory, stat.S_IXOTH)


def grant_read(tree: Path) -> None:
    for dirpath, _, filenames in os.walk(tree):
        add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                add_mode(path, stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))


def ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedServerError(
            f"PostgreSQL will not run as root and `useradd` is missing: create a user {name!r}"
        )
    log.info("creating system user %s to run PostgreSQL (it refuses to run as root)", name)
    args = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603
    try:
        return pwd.getpwnam(name)  # also when a concurrent process created it first
    except KeyError:
        raise EmbeddedServerError(f"could not create user {name!r}: {result.stderr}") from None


def own_private_dir(path: Path, run_as: RunAs | None) -> None:
    """Create *path* (mode 0700) belonging to *run_as*, fixing ownership of what it holds."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    if run_as is None or path.stat().st_uid == run_as.uid:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (".", *dirnames, *filenames):
            os.lchown(Path(dirpath, name), run_as.uid, run_as.gid)
