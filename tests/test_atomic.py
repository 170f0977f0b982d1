"""Interrupted writes leave the old file (or folder) or nothing, and no temporary files.

Interruptions are simulated in-process (an exception or Ctrl-C inside the writer) and done for real
by killing a writer process mid-write with SIGTERM, SIGINT and SIGKILL.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from icl_probe.errors import InputError
from icl_probe.fileio import atomic_write, atomic_write_dir, atomic_write_text, check_writable, remove_stale

WRITER = textwrap.dedent(
    """
    import signal, sys, time
    from icl_probe.fileio import atomic_write, atomic_write_dir

    # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)

    target, kind = sys.argv[1], sys.argv[2]

    def slow(tmp):
        if kind == "file":
            tmp.write_bytes(b"new" * 100_000)
        else:
            (tmp / "weights").write_bytes(b"new" * 100_000)
        print("writing", flush=True)
        time.sleep(120)

    (atomic_write if kind == "file" else atomic_write_dir)(target, slow)
    """
)


def leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def kill_mid_write(target: Path, kind: str, sig: int) -> int:
    """Start a writer of `target`, wait until it is inside the write, send `sig`; its exit code."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()


def old_folder(path: Path) -> Path:
    path.mkdir()
    (path / "weights").write_text("old")
    return path


class Boom(Exception):
    pass


def explode_after(write):
    def writer(tmp: Path):
        write(tmp)
        raise Boom("mid-write")

    return writer


# ---- in-process interruptions --------------------------------------------------------------------


def test_exception_mid_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    with pytest.raises(Boom):
        atomic_write(out, explode_after(lambda tmp: tmp.write_text("half")))
    assert out.read_text() == "old"
    assert leftovers(tmp_path, "out.json") == []


def test_exception_mid_write_leaves_nothing_when_there_was_nothing(tmp_path):
    with pytest.raises(Boom):
        atomic_write(tmp_path / "out.json", explode_after(lambda tmp: tmp.write_text("half")))
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_mid_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")

    def interrupted(tmp: Path):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, interrupted)
    assert out.read_text() == "old"
    assert leftovers(tmp_path, "out.json") == []


def test_os_error_mid_write_is_an_input_error(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")

    def full_disk(tmp: Path):
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="cannot write .*out.json: No space left on device"):
        atomic_write(out, full_disk)
    assert out.read_text() == "old"
    assert leftovers(tmp_path, "out.json") == []


def test_exception_mid_folder_write_keeps_the_old_folder(tmp_path):
    out = old_folder(tmp_path / "adapter")
    with pytest.raises(Boom):
        atomic_write_dir(out, explode_after(lambda tmp: (tmp / "weights").write_text("half")))
    assert (out / "weights").read_text() == "old" and sorted(os.listdir(out)) == ["weights"]
    assert leftovers(tmp_path, "adapter") == []


def test_folder_write_replaces_a_folder_whole(tmp_path):
    out = old_folder(tmp_path / "adapter")
    (out / "stale").write_text("from the old export")
    atomic_write_dir(out, lambda tmp: (tmp / "weights").write_text("new"))
    assert sorted(os.listdir(out)) == ["weights"] and (out / "weights").read_text() == "new"
    assert leftovers(tmp_path, "adapter") == []


def test_successful_write_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert leftovers(tmp_path, "a.txt") == []


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_new_files_and_folders_get_the_usual_permissions(tmp_path):
    # mkstemp and mkdtemp make private (0600, 0700) temporaries; the renamed output must not stay private.
    atomic_write_text(tmp_path / "a.json", "x")
    atomic_write_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_text("x"))
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~current_umask()
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o777 & ~current_umask()


def test_replaced_file_keeps_its_permissions(tmp_path):
    out = tmp_path / "a.json"
    out.write_text("old")
    out.chmod(0o640)
    atomic_write_text(out, "new")
    assert os.stat(out).st_mode & 0o777 == 0o640


def test_the_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    atomic_write_text(tmp_path / "a.txt", "x")
    with pytest.raises(Boom):
        atomic_write(tmp_path / "a.txt", explode_after(lambda tmp: None))
    assert signal.getsignal(signal.SIGTERM) is before


def test_check_writable_leaves_no_probe_behind(tmp_path):
    check_writable(tmp_path / "out.json", force=False)
    assert list(tmp_path.iterdir()) == []


# ---- killed writer processes ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_terminated_writer_keeps_the_old_file_and_cleans_up(tmp_path, sig):
    out = tmp_path / "patch.safetensors"
    out.write_bytes(b"old")
    code = kill_mid_write(out, "file", sig)
    assert code != 0
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path, out.name) == []


def test_terminated_writer_of_a_new_file_leaves_nothing(tmp_path):
    assert kill_mid_write(tmp_path / "patch.safetensors", "file", signal.SIGTERM) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_terminated_folder_writer_keeps_the_old_folder(tmp_path):
    out = old_folder(tmp_path / "adapter")
    kill_mid_write(out, "dir", signal.SIGTERM)
    assert (out / "weights").read_text() == "old" and sorted(os.listdir(out)) == ["weights"]
    assert leftovers(tmp_path, "adapter") == []


def test_killed_writer_keeps_the_old_file_and_its_temporary_is_swept_next_time(tmp_path):
    out = tmp_path / "patch.safetensors"
    out.write_bytes(b"old")
    assert kill_mid_write(out, "file", signal.SIGKILL) == -signal.SIGKILL
    assert out.read_bytes() == b"old"
    stale = leftovers(tmp_path, out.name)
    assert len(stale) == 1 and stale[0].startswith(".patch.safetensors.")  # SIGKILL allows no cleanup
    atomic_write(out, lambda tmp: tmp.write_bytes(b"new"))
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path, out.name) == []


def test_killed_folder_writer_keeps_the_old_folder_and_is_swept_next_time(tmp_path):
    out = old_folder(tmp_path / "adapter")
    kill_mid_write(out, "dir", signal.SIGKILL)
    assert (out / "weights").read_text() == "old"
    assert len(leftovers(tmp_path, "adapter")) == 2  # the new folder and the (empty) place to put the old one
    atomic_write_dir(out, lambda tmp: (tmp / "weights").write_text("new"))
    assert (out / "weights").read_text() == "new"
    assert leftovers(tmp_path, "adapter") == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_dead_writers_of_the_same_target(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".out.json.{dead}.abcd_123.tmp"
    live = tmp_path / f".out.json.{os.getpid()}.abcd_123.tmp"  # a writer that is still running: this one
    other = tmp_path / f".out.json.5.{dead}.abcd_123.tmp"  # a temporary of the target "out.json.5"
    unrelated = tmp_path / ".out.json.notapid.tmp"
    for p in (stale, live, other, unrelated):
        p.write_text("x")
    remove_stale(tmp_path / "out.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other, unrelated))
