"""Helpers the test files share: the CLI as a user runs it, and expectations in plain torch (last-token logits,
forward hooks, module outputs) that run no icl-probe code, so that tests compare the package with something else."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


def state(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor in the model's state dict, to check later that it was left bit for bit as it was."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def last_logits(model, ids: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The logits after `ids` from one plain forward of the whole sequence, shape (vocab,), in `dtype` if given."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return logits if dtype is None else logits.to(dtype)


@contextlib.contextmanager
def forward_hooks(pairs: list[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """torch forward hooks (module, hook(module, args, output)) registered for the block and always removed."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a module's output: the output itself, or the first of a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def last_outputs(model, paths: list[str], ids: list[int]) -> dict[str, torch.Tensor]:
    """Each module's output at the last token of `ids`, read by torch forward hooks of this module's own around
    one plain forward: no icl-probe code runs."""
    seen = {}

    def record(path):
        def hook(module, args, output):
            y = hidden(output)
            seen[path] = y.reshape(-1, y.shape[-1])[-1].clone()

        return hook

    with forward_hooks([(model.get_submodule(p), record(p)) for p in paths]):
        last_logits(model, ids)
    return seen


def last_inputs(model, paths: dict, ids: list[int]) -> dict:
    """Each module's input at the last token of `ids`, (hidden,) float64, under its key in `paths` ({key: path}),
    read the same way as last_outputs."""
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = args[0].reshape(-1, args[0].shape[-1])[-1].to(torch.float64).clone()

        return hook

    with forward_hooks([(model.get_submodule(path), record(key)) for key, path in paths.items()]):
        last_logits(model, ids)
    return seen
