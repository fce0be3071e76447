"""Atomic writes (a crash never leaves a half-written file or folder that a later run would trust), the cache
folder, one lock per output folder, and the removal of temporary files that killed runs left behind.

Every temporary name carries its writer's PID and host (``.<name>.~<pid>@<host>~<random>.tmp``), so a later
run can tell debris of a dead process from the work in progress of a live one, even in a shared cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "SALM_CACHE"


def cache_root() -> Path:
    """saLM's cache folder: ``$SALM_CACHE``, else ``$XDG_CACHE_HOME/salm``, else ``~/.cache/salm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "salm"
    return Path.home() / ".cache" / "salm"


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temp file in the target folder, then rename it over ``path``.

    The file gets the permissions an ordinary ``open(path, "w")`` would give (0666 minus the umask), not
    the temp file's private 0600, so reports and heads stay readable by whoever may read the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda t: Path(t).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any], ensure_ascii: bool = False) -> Path:
    """One JSON object per line (UTF-8), written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------- owners
def hostname() -> str:
    """This machine's name, reduced to characters safe in file names."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def owner_tag(pid: int | None = None) -> str:
    """``~<pid>@<host>~``: marks a temporary name with the process that owns it."""
    return f"~{os.getpid() if pid is None else pid}@{hostname()}~"


_OWNER = re.compile(r"~(\d+)@([A-Za-z0-9_-]+)~")
_LEGACY_CACHE_TMP = re.compile(r"\.tmp-(\d+)$")  # feature-cache folders of saLM before owner tags


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process we may not signal still exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def stale_temporaries(folder: str | os.PathLike, recursive: bool = False, untagged: bool = False) -> list[Path]:
    """Temporary files and folders under ``folder`` whose owner (a process on this machine) is dead.

    Names owned by processes on other machines are left alone (their liveness cannot be checked here).
    Feature-cache folders of older saLM versions (``.<split>-<key>.tmp-<pid>``) count as this machine's.
    ``untagged`` also takes ``.*.tmp`` names without an owner directly in ``folder`` (temporary files of
    older saLM versions): only for a folder this process holds the :func:`output_lock` of.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[Path] = []
    here = hostname()
    entries = folder.rglob(".*") if recursive else folder.glob(".*")
    for p in sorted(entries):
        if any(part.startswith(".") and (".tmp" in part) for part in p.relative_to(folder).parts[:-1]):
            continue  # inside a temporary folder already listed
        m = _OWNER.search(p.name)
        if m and (p.name.endswith(".tmp") or ".tmp-" in p.name):
            pid, host = int(m.group(1)), m.group(2)
            if host == here and not pid_alive(pid):
                found.append(p)
            continue
        legacy = _LEGACY_CACHE_TMP.search(p.name)
        if legacy and p.is_dir() and not pid_alive(int(legacy.group(1))):
            found.append(p)
        elif untagged and p.parent == folder and p.name.endswith(".tmp"):
            found.append(p)
    return found


def remove_stale_temporaries(
    folder: str | os.PathLike, recursive: bool = False, untagged: bool = False
) -> tuple[int, int]:
    """Delete :func:`stale_temporaries`; returns (how many, bytes freed). Errors on one entry skip it."""
    count = freed = 0
    for p in stale_temporaries(folder, recursive, untagged):
        try:
            size = _size(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        count += 1
        freed += size
    return count, freed


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def report_stale_temporaries(
    folder: str | os.PathLike, recursive: bool = False, untagged: bool = False, prog: str = "salm"
) -> int:
    """Remove what killed runs left in ``folder`` and say so on stderr; returns the bytes freed."""
    count, freed = remove_stale_temporaries(folder, recursive, untagged)
    if count:
        print(
            f"{prog}: removed {count} temporary file(s)/folder(s) left by killed runs in {folder} "
            f"({human_bytes(freed)} freed)",
            file=sys.stderr,
        )
    return freed


# ---------------------------------------------------------------------------------------------- folders
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name in the same parent, then rename it to ``path`` as a unit.

    A crash leaves either the previous complete folder or none at ``path``, never a half-written one (at
    worst a temporary folder, removed by the next run's cleanup). An existing folder is moved aside first
    and deleted after the rename, since a rename cannot replace a non-empty folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}", suffix=".tmp"))
    try:
        yield tmp
        _ordinary_modes(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}old", suffix=".tmp"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ordinary_modes(folder: Path) -> None:
    """Give everything under ``folder`` the mode an ordinary ``open``/``mkdir`` would (0666 or 0777 minus the
    umask; executables keep their x bits). Some writers create private 0600 files (safetensors' ``save_file``
    does), which would leave e.g. ``heads.safetensors`` unreadable beside its 0644 config."""
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        full = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if full else 0o666) & ~_UMASK)


# ---------------------------------------------------------------------------------------------- locks
LOCK_NAME = ".salm.lock"


class OutputLockedError(RuntimeError):
    """Another live run holds this output folder's lock; the message names the folder and its PID."""


_held: dict[tuple[str, int], tuple[int, int]] = {}  # (lock path, thread) -> (fd, depth): re-entrant per thread


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str = "salm") -> Iterator[Path]:
    """Hold ``<folder>/.salm.lock`` for the duration: one run writes into an output folder at a time.

    The kernel lock (``flock``) is the mutex, so it is freed however a run dies; the file records PID,
    host and start time for the messages. A second run fails at once naming the folder and the holder's
    PID; a lock file left by a dead process is taken over with a message. Re-entrant within a thread (so
    ``salm evaluate`` may lock before loading members and :func:`evaluate` again); another thread of the
    same process is refused like another process.
    """
    import fcntl
    import threading

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = (str(path.resolve()), threading.get_ident())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_lock(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by another run ({_describe(holder)}); wait for it to finish or use another "
                f"--output_dir (if that process is gone, delete {path})"
            ) from None
        try:  # the file may have been unlinked by its releasing holder between open and flock: retry
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_lock(fd)
    if previous.get("pid"):
        print(
            f"{command}: taking over the lock of {folder} left by a process that is no longer running "
            f"({_describe(previous)})",
            file=sys.stderr,
        )
    info = {
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = (fd, 1)
    try:
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # closing releases the flock


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "PID unknown"
    parts = [f"PID {info['pid']}", f"host {info.get('host', '?')}"]
    if info.get("command"):
        parts.append(str(info["command"]))
    if info.get("time"):
        parts.append(f"since {info['time']}")
    return ", ".join(parts)
