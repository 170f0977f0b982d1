"""allocator.keep_freed, checked against glibc itself: where a block of 20 MB comes from (mallinfo2's mmapped bytes)
and whether it stays for reuse once freed (the arena's free bytes), in fresh processes, with and without it."""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from icl_probe.allocator import MMAP_BYTES, glibc, keep_freed

pytestmark = pytest.mark.skipif(
    not glibc() or not hasattr(ctypes.CDLL("libc.so.6") if glibc() else None, "mallinfo2"),
    reason="glibc ≥ 2.33 (mallinfo2) only",
)

BLOCK = 20 << 20  # below MMAP_BYTES, far above glibc's default first mmap threshold (128 KiB)

# Run in a fresh process: `prepare` (Python source) may call keep_freed or the command line; then one block is
# allocated and freed with libc's own malloc, and the mmapped and free bytes are read before and after.
PROBE = f"""
import ctypes, json, sys
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = None
exec(sys.argv[1])
before = libc.mallinfo2()
block = libc.malloc({BLOCK})
ctypes.memset(block, 1, {BLOCK})
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({{"applied": applied, "mmapped": held.hblkhd - before.hblkhd,
                  "freed_kept": after.fordblks - before.fordblks, "free_after": after.fordblks,
                  "mmapped_after": after.hblkhd - before.hblkhd}}))
"""


APPLY = "from icl_probe.allocator import keep_freed; applied = keep_freed()"


def probe(prepare: str, env: dict | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROBE, prepare], capture_output=True, text=True,
                          env={**clean, **(env or {})}, check=True, timeout=120)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_kept_block_comes_from_the_heap_and_stays_for_reuse():
    assert BLOCK < MMAP_BYTES
    default = probe("pass")
    assert default["mmapped"] >= BLOCK  # glibc's default: fresh pages, handed back when freed
    assert default["mmapped_after"] == 0 and default["freed_kept"] < BLOCK
    kept = probe(APPLY)
    assert kept["applied"] is True
    assert kept["mmapped"] == 0  # from the heap
    assert kept["freed_kept"] >= BLOCK  # and still there, free, after it is freed


def test_a_process_that_sets_its_allocator_keeps_its_setting():
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        assert keep_freed({name: "65536"}) is False
    own = probe(
        "from icl_probe.allocator import keep_freed; applied = keep_freed()", {"MALLOC_MMAP_THRESHOLD_": "65536"}
    )
    assert own["applied"] is False and own["mmapped"] >= BLOCK  # the environment's 64 KiB threshold still rules


def test_the_command_line_keeps_freed_memory(tiny_llama_dir):
    """A command that loads a model applies keep_freed: after `icl-probe analyze`, a block comes from the heap and
    stays there, free, once freed. The command leaves free chunks in the arena, which the block may take part of
    (a fresh clone's run measured 28 kB of it), so the arena's free bytes after the free are counted here, not
    their growth."""
    prepare = (
        "from typer.testing import CliRunner; from icl_probe.cli.app import app; "
        f"r = CliRunner().invoke(app, ['analyze', '-m', {str(tiny_llama_dir)!r}, '--context', 'a -> b\\n', "
        "'--query', 'c ->']); assert r.exit_code == 0, r.output"
    )
    after_cli = probe(prepare, {"HF_HUB_OFFLINE": "1"})
    assert after_cli["mmapped"] == 0 and after_cli["free_after"] >= BLOCK
