"""Writing outputs so that nothing half-written ever looks finished, nothing a user owns is
overwritten, and no two processes write one output.

- :func:`atomic_path` / :func:`temp_sibling`: every temporary file has a unique name (pid +
  random), so two writers never rename each other's half-written file into place.
- :func:`output_lock`: an advisory lock (``fcntl.flock``) on a hidden sibling
  ``.NAME.lock`` of an output file or directory, taken before any work; a second writer is
  refused at once with the holder's pid.
- :func:`check_output`: refuses an output that is also an input, a directory where a file
  is expected, and an existing file of another kind unless ``--overwrite``.
- :func:`require_file` / :func:`require_dir`: "does not exist" vs "is a directory" (or "is
  not a directory") for inputs.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dgm_eit.errors import InputError


def temp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A temporary name next to ``path`` unique to this process and call:
    ``NAME.TAG-PID-RANDOM`` before the suffix (``fig.tmp-12-ab12cd34.png``), so writers
    that pick a format from the suffix still work."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block
    succeeds, and is removed if it fails. The suffix is kept (``x.tmp-PID-RAND.png``) so
    writers that pick a format from the name still work. An error writing the temporary
    file names ``path``, the file the user asked for."""
    from dgm_eit.runtime import parent_gone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        try:
            yield tmp
            if parent_gone():
                # a pool worker outlived its main process by a moment: the output's lock is
                # gone with it, so nothing may land
                raise OrphanedWorker(f"not writing {path}: the process that started this worker is gone")
            os.replace(tmp, path)
        except OSError as err:
            if str(tmp) in str(err) or getattr(err, "filename", None) in (str(tmp), tmp):
                reason = err.strerror or str(err).replace(str(tmp), str(path))
                raise InputError(f"cannot write {path}: {reason}") from None
            raise
    finally:
        tmp.unlink(missing_ok=True)


class OrphanedWorker(RuntimeError):
    """A worker process found its main process gone before renaming an output into place."""


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` durably (fsync) and atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def read_json(path: str | Path, advice: str = ""):
    """A JSON file's content; an unreadable or truncated one raises InputError naming the
    file (json's own message gives only a line and column)."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is damaged or unreadable ({err})" + (f"; {advice}" if advice else "")) from None


# ---------------------------------------------------------------------------------
# one writer per output


def lock_path(path: str | Path) -> Path:
    """The lock file of an output file or directory: a hidden sibling ``.NAME.lock``."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class OutputLocked(InputError):
    """Another process holds the output's lock."""


@contextmanager
def output_lock(path: str | Path, command: str = "dgm-eit") -> Iterator[Path]:
    """Hold the advisory lock of output ``path`` (a file or a run directory) for the block.

    Taken before any work, so a second process on the same output is refused at once
    (:class:`OutputLocked`, naming the holder's pid) instead of computing everything and
    racing the first to rename its result into place. The lock is released, and its file
    removed, when the block ends; a lock file left by a killed process is stale and taken
    over (the kernel drops a dead process's ``flock``)."""
    import fcntl

    path = Path(path)
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:   # e.g. a read-only directory: name the output, not the lock file
            raise InputError(f"cannot write {path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(lock)
            raise OutputLocked(f"{path} is being written by another process ({holder}); wait for it to "
                               "finish or stop it, then re-run") from None
        # the holder before us may have removed the file between our open and our lock:
        # then we locked a file nobody else will see, so try again on the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield lock
    finally:
        try:
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _read_holder(lock: Path) -> str:
    try:
        text = lock.read_text().split(None, 1)
    except OSError:
        text = []
    if text and text[0].isdigit():
        what = text[1].strip() if len(text) > 1 else "dgm-eit"
        return f"{what}, pid {text[0]}"
    return "pid unknown"


# ---------------------------------------------------------------------------------
# inputs and outputs


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path when it is an existing regular file; otherwise an InputError that
    says whether it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    return path


def require_dir(path: str | Path, what: str = "directory") -> Path:
    """``path`` as a Path when it is an existing directory; otherwise an InputError that says
    whether it is missing or something else."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{what} {path} is not a directory" if path.exists() else f"{what} {path} does not exist")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: str | Path, *, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 own_kind: Callable[[Path], bool] | None = None, kind: str = "output",
                 overwrite: bool = False, option: str = "--out") -> Path:
    """Refuse an output path that would destroy something the user owns.

    ``inputs``: ``(option, path)`` pairs the command reads; writing over one of them is
    refused even with ``--overwrite``. An existing directory is refused. An existing file
    for which ``own_kind(path)`` is false (not a file this command makes) is refused unless
    ``overwrite``; one of the command's own kind is replaced, as re-running a command does."""
    out = Path(out)
    for name, source in inputs:
        if source is not None and (_same_file(out, Path(source))
                                   or out.resolve() == Path(source).resolve()):
            raise InputError(f"{option} {out} is also the input {name} {source}; "
                             "choose another output file name")
    if out.is_dir():
        raise InputError(f"{option} {out} is a directory; give a file name")
    if out.exists() and not overwrite and own_kind is not None and not own_kind(out):
        raise InputError(f"{option} {out} exists and is not a {kind}; pass --overwrite to replace it, "
                         "or choose another file name")
    return out


def has_magic(path: Path, *magics: bytes) -> bool:
    """True when the file starts with one of ``magics`` (an empty file counts as none)."""
    try:
        with open(path, "rb") as f:
            head = f.read(max(len(m) for m in magics))
    except OSError:
        return False
    return any(head.startswith(m) for m in magics)


IMAGE_MAGIC = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".jpg": (b"\xff\xd8",), ".jpeg": (b"\xff\xd8",),
               ".svg": (b"<?xml", b"<svg")}


def is_image_file(path: Path) -> bool:
    """An image file of the kind its suffix names (what ``show`` and ``reconstruct`` draw)."""
    return has_magic(path, *IMAGE_MAGIC.get(path.suffix.lower(), (b"\x89PNG",)))


def is_npy_file(path: Path) -> bool:
    return has_magic(path, b"\x93NUMPY")
