"""Helpers the test files share: the CLI as a user runs it, and plain-torch expectations (last-token logits and
module outputs) that use no icl-probe code, so that the tests compare the package with something independent."""

from __future__ import annotations

import torch
from typer.testing import CliRunner, Result

from icl_probe.cli import app


def run(*args, columns: int | None = None, env: dict | None = None, catch_exceptions: bool = True,
        check: bool = False) -> Result:  # fmt: skip
    """`icl-probe ARGS` through typer's CliRunner, its output piped, every argument as a string; `columns` sets
    COLUMNS (the terminal's width) on top of `env`, and `check` asserts that it exits 0."""
    env = {**(env or {}), **({"COLUMNS": str(columns)} if columns is not None else {})}
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="icl-probe", env=env,
                                catch_exceptions=catch_exceptions)  # fmt: skip
    if check:
        assert result.exit_code == 0, result.output
    return result


def run_parts(*args) -> tuple[int, str, str]:
    """`run`'s exit code, stdout and stderr."""
    result = run(*args)
    return result.exit_code, result.stdout, result.stderr


def last_logits(model, ids: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The logits after `ids` from one plain forward of the whole sequence, shape (vocab,), in `dtype` if given."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return logits if dtype is None else logits.to(dtype)


def last_outputs(model, paths: list[str], ids: list[int]) -> dict[str, torch.Tensor]:
    """Each module's output at the last token of `ids`, read by torch forward hooks of this function's own
    around one plain forward: no icl-probe code runs."""
    seen = {}

    def record(path):
        def hook(module, args, output):
            y = output if isinstance(output, torch.Tensor) else output[0]  # some modules return (hidden, ...)
            seen[path] = y.reshape(-1, y.shape[-1])[-1].clone()

        return hook

    handles = [model.get_submodule(p).register_forward_hook(record(p)) for p in paths]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen
