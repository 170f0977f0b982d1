"""Atomic file writes: everything goes to a temporary name in the target's folder, then is renamed.

An interrupted write leaves the old file or nothing. Ctrl-C, SIGTERM and exceptions remove the
temporary at once; a writer killed outright (SIGKILL) leaves it, and the next write to the same
target removes it: temporaries are named `.{name}.{pid}.{random}.tmp`, and those whose process
no longer runs are stale.
"""

from __future__ import annotations

__all__ = [
    "check_writable", "atomic_write", "atomic_write_text", "atomic_write_dir", "temporary", "usual_mode",
    "remove_stale", "terminate_cleanly"
]  # fmt: skip

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


def check_writable(path: str | Path, force: bool, directory: bool = False) -> Path:
    """Refuse an existing output without `force`, an output of the wrong kind, or a parent that cannot be written to.

    `directory` says the output is a folder (a peft adapter, a merged model): with `force` an existing
    folder is replaced, but only one that looks like such an output or is empty, never any other folder.
    """
    path = Path(path)
    if directory:
        check_folder_output(path, force)
    elif path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file path")
    elif path.exists() and not force:
        raise InputError(f"{path} already exists; pass `force=True` to overwrite it")
    folder = path.parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"cannot write {path}: {folder} {state}; choose an output in an existing folder")
    with temporary(path, directory=directory):  # a real write is the only reliable test (root, read-only mounts)
        pass
    return path


OUTPUT_MARKERS = ("icl-probe.json", "adapter_config.json")  # one of them is in every peft or merged output


def check_folder_output(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(f"cannot write the folder {path}: a file of that name exists; give a folder path")
    if not path.is_dir():
        return
    if not force:
        raise InputError(f"{path} already exists; pass `force=True` to replace it")
    if any(path.iterdir()) and not any((path / m).is_file() for m in OUTPUT_MARKERS):
        raise InputError(
            f"will not replace the folder {path}: it holds neither {' nor '.join(OUTPUT_MARKERS)}, so it is not "
            "an adapter or merged model written before, and `force=True` would delete all of it; give a new folder path"
        )


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    remove_stale(path)
    with terminate_cleanly(), temporary(path, directory=False) as tmp:
        try:
            write(tmp)
            fsync(tmp)
            os.chmod(tmp, final_mode(path, 0o666))
            os.replace(tmp, path)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from e


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_dir) on a temporary folder beside `path`, then swap it into place.

    An existing `path` is first renamed aside (to another temporary name) and deleted last, so an
    interruption leaves the old folder, the new one, or (between two renames) nothing.
    """
    path = Path(path)
    remove_stale(path)
    with terminate_cleanly(), temporary(path, directory=True) as tmp, temporary(path, directory=True) as aside:
        try:
            write(tmp)
            usual_modes(tmp)
            os.chmod(tmp, final_mode(path, 0o777))
            if path.is_dir():
                os.replace(path, aside)  # renaming a folder over an empty folder is allowed
            elif path.exists():
                os.replace(path, aside / path.name)
            os.replace(tmp, path)
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from e


@contextmanager
def temporary(path: Path, directory: bool) -> Iterator[Path]:
    """A fresh temporary file or folder named `.{name}.{pid}.{random}.tmp` beside `path`, always removed."""
    prefix = f".{path.name}.{os.getpid()}."
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}; choose another output path") from e
    try:
        yield tmp
    finally:
        remove(tmp)


def final_mode(path: Path, default: int) -> int:
    """The permissions of the file being replaced, or `default` less the umask (mkstemp's 0600 is too tight)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return usual_mode(default)


def usual_mode(default: int) -> int:
    """`default` (0o666 for files, 0o777 for folders) less the umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return default & ~mask


def usual_modes(folder: Path) -> None:
    """Give everything inside `folder` the user's usual modes: writers such as safetensors' make 0600 files."""
    file_mode, folder_mode = usual_mode(0o666), usual_mode(0o777)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, folder_mode if p.is_dir() else file_mode)


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        try:
            p.unlink()
        except OSError:
            pass


def fsync(p: Path) -> None:
    """Flush a written file to disk, so that the rename never exposes a file whose data is not there yet."""
    with open(p, "rb+") as f:
        os.fsync(f.fileno())


def remove_stale(path: Path) -> None:
    """Delete temporaries beside `path` left by writers of `path` that were killed (their pid is gone)."""
    if os.name != "posix" or not path.parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[a-z0-9_]+\.tmp")
    for p in path.parent.iterdir():
        match = pattern.fullmatch(p.name)
        if match and not running(int(match.group(1))):
            remove(p)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def terminate_cleanly() -> Iterator[None]:
    """While a temporary exists, make SIGTERM raise SystemExit(143) so that `finally` removes it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
