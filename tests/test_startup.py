"""An instant command line: --help, --version, every `<command> --help` and `tasks` run without torch.

Each path runs in a fresh Python process, as the `icl-probe` script does, and reports which of torch and
transformers ended up in `sys.modules`. The library's lazy names (`icl_probe.analyze`, ...) still resolve.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import icl_probe

ROOT = Path(icl_probe.__file__).resolve().parents[1]
COMMANDS = [
    "analyze", "dynamics", "transfer", "heads", "regression", "study", "export-patch", "replay", "batch", "merge",
    "modules", "tasks",
]  # fmt: skip
PATHS = [
    ["--help"], ["-h"], ["--version"], ["tasks"], ["tasks", "--json", "-"], ["regression", "train", "--help"],
    ["regression", "run", "--help"], *([command, "--help"] for command in COMMANDS),
]  # fmt: skip

SCRIPT = """
import json, sys
from icl_probe.cli import main
sys.argv = ["icl-probe", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code or 0
sys.stdout.flush()
print(json.dumps({"code": code, "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}), file=sys.stderr)
"""


def run_fresh(args: list[str]) -> tuple[dict, str]:
    """(the exit code and heavy modules loaded, stdout) of `icl-probe ARGS` in a fresh interpreter."""
    env = {"PYTHONPATH": str(ROOT), "COLUMNS": "80", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


@pytest.mark.parametrize("args", PATHS, ids=" ".join)
def test_path_starts_without_torch_or_transformers(args):
    report, stdout = run_fresh(args)
    assert report == {"code": 0, "loaded": []}, (args, report)
    assert stdout.strip(), args  # it printed what it was asked for


def test_every_command_is_covered():
    from typer.main import get_command

    from icl_probe.cli import app

    group = get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)
    assert sorted(group.commands["regression"].commands) == ["run", "train"]


def test_tasks_without_torch_lists_the_built_in_tasks():
    from icl_probe.tasks import tasks_document

    report, stdout = run_fresh(["tasks", "--json", "-"])
    assert report["loaded"] == []
    assert json.loads(stdout) == tasks_document()  # the same document as the library computes in this process


def test_library_names_resolve_lazily():
    assert icl_probe.score_heads is sys.modules["icl_probe.heads"].score_heads
    assert icl_probe.track_dynamics is sys.modules["icl_probe.dynamics"].track_dynamics
    assert icl_probe.analyze is sys.modules["icl_probe.analysis"].analyze
    assert icl_probe.load_model is sys.modules["icl_probe.models"].load_model
    for name in (n for n in icl_probe.__all__ if not n.startswith("__")):
        value = getattr(icl_probe, name)  # the class or function its module defines under that name
        assert getattr(sys.modules[value.__module__], name) is value, name
    assert set(icl_probe.__all__) <= set(dir(icl_probe))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        icl_probe.nope  # noqa: B018


def test_a_fresh_library_import_is_light_until_a_name_is_used():
    code = (
        "import sys, icl_probe; before = 'torch' in sys.modules; icl_probe.analyze; "
        "from icl_probe import score_heads as f; print(before, 'torch' in sys.modules, callable(f), type(f).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.stdout.split() == ["False", "True", "True", "function"], done.stderr
