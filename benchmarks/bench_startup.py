"""How long `icl-probe` takes to start: each path in a fresh process, beside `python -c pass` in the same run.

Every arm is a fresh interpreter started the way the `icl-probe` script starts (`from icl_probe.cli import main;
main()`), stdout and stderr sent to /dev/null. The arms are interleaved within each repeat, so that a busy
machine weighs on all of them alike; the figure is the median over R repeats (after one warm-up round that
fills the file cache). Wall time is what a user waits; CPU time (user + system, from the child's rusage) is
less sensitive to other jobs. Goal: ≤ 0.3 s wall for --help, --version, every `<command> --help` and `tasks`.
Beside them: typer's own imports (typer 0.29 builds each option's pydantic adapter, so any typer command
that parses an option imports pydantic: the floor of a typer CLI), and `import torch` and `import torch,
transformers`, what those paths cost when they loaded both.

    python benchmarks/bench_startup.py [--repeat R] [--json PATH] [--source DIR]

--source runs another copy of the package (its folder holding icl_probe/), e.g. an older checkout to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 0.3
CLI = "from icl_probe.cli import main; main()"
ARMS = {
    "python -c pass": ["-c", "pass"],
    "icl-probe --help": ["-c", CLI, "--help"],
    "icl-probe --version": ["-c", CLI, "--version"],
    "icl-probe tasks": ["-c", CLI, "tasks"],
    "icl-probe analyze --help": ["-c", CLI, "analyze", "--help"],
    "icl-probe transfer --help": ["-c", CLI, "transfer", "--help"],
    "icl-probe regression train --help": ["-c", CLI, "regression", "train", "--help"],
    "icl-probe regression run --help": ["-c", CLI, "regression", "run", "--help"],
    "typer + its pydantic (the floor)": ["-c", "import typer.main, typer._adapters"],
    "import torch": ["-c", "import torch"],
    "import torch, transformers": ["-c", "import torch, transformers"],
}
REFERENCES = ("python -c pass", "typer + its pydantic (the floor)", "import torch", "import torch, transformers")


def time_once(args: list[str], env: dict, source: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one fresh interpreter running `args` in `source` (`-c` puts the working folder first)."""
    start = time.perf_counter()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with subprocess.Popen([sys.executable, *args], env=env, cwd=source, **quiet) as p:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"bench_startup: {' '.join(args)} exited with {p.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(repeat: int, env: dict, source: Path) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per arm, the arms interleaved within each repeat, after one warm-up round."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ARMS}
    for round_ in range(repeat + 1):
        for name, args in ARMS.items():
            result = time_once(args, env, source)
            if round_:
                runs[name].append(result)
    return {
        name: {"wall_s": statistics.median(w for w, _ in rs), "cpu_s": statistics.median(c for _, c in rs)}
        for name, rs in runs.items()
    }


def table(figures: dict[str, dict[str, float]]) -> list[str]:
    base = figures["python -c pass"]
    lines = [
        f"{'path':<34} {'wall s':>7} {'× pass':>7} {'CPU s':>6}  goal ≤ {GOAL_S} s",
        "-" * 70,
    ]
    for name, f in figures.items():
        verdict = "" if name in REFERENCES else ("met" if f["wall_s"] <= GOAL_S else "NOT met")
        ratio = f["wall_s"] / base["wall_s"]
        lines.append(f"{name:<34} {f['wall_s']:>7.3f} {ratio:>7.1f} {f['cpu_s']:>6.3f}  {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    source = args.source.resolve()
    env = {**os.environ, "PYTHONPATH": str(source), "COLUMNS": "80"}
    env.setdefault("OMP_NUM_THREADS", "1")
    figures = measure(args.repeat, env, source)
    print(f"{args.repeat} repeats, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {args.source}")
    print("\n".join(table(figures)))
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "goal_s": GOAL_S, "arms": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
