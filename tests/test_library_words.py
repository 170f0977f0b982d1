"""The library names its parameters, the CLI names its flags: no `--flag` in the library's strings, the one
rewrite (`as_flags`) at the CLI's boundary, and real errors worded both ways."""

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import icl_probe
from icl_probe import toy
from icl_probe.cli import app
from icl_probe.cli.app import as_flags
from icl_probe.errors import InputError, UsageError
from icl_probe.export import resolve_residual
from icl_probe.fileio import check_writable

PACKAGE = Path(icl_probe.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
# Other programs' flags the library quotes in commands for the user to run (pip, torchrun): not icl-probe's.
OTHER_PROGRAMS = {"--no-deps", "--force-reinstall", "--nproc_per_node"}


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts)


def strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant with its line; an f-string as one text, each {field} read as `x`. The arguments of
    argparse's `add_argument` are left out: they define a script's own command line (coverage.py)."""
    inner = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    parser_args = {
        id(a)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for a in node.args
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values)
            found.append((node.lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner | parser_args:
            found.append((node.lineno, node.value))
    return found


def flags_in(path: Path) -> list[str]:
    return [
        f"{path.name}:{line}: {flag}"
        for line, text in strings(ast.parse(path.read_text(encoding="utf-8")))
        for flag in FLAG.findall(text)
        if flag not in OTHER_PROGRAMS
    ]


def test_the_scan_finds_flags_in_f_strings_and_docstrings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Doc: use --layers."""\nx = f"give --{what} or --{what}-file"\ny = "a--b, --; pip --no-deps"\n')
    assert flags_in(path) == ["m.py:1: --layers", "m.py:2: --x", "m.py:2: --x-file"]


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_strings_name_no_flag(path):
    assert flags_in(path) == []


# ---- as_flags --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, worded",
    [
        ("leave this layer out with `layers`", "leave this layer out with --layers"),
        ('drop `generate` or `positions="all"`', "drop --generate or --positions all"),
        ("pass `generate=N`; or `generate=0`", "pass --generate N; or --generate 0"),
        ("export it with `store_context=True`", "export it with --store-context"),
        ("`gradient=False` skips it", "--no-gradient skips it"),
        ("use `dtype='float32'` or `device=\"cpu\"`", "use --dtype float32 or --device cpu"),
        ("`json_path` is a folder", "--json is a folder"),
        ("`hidden_size=5` must be divisible by `num_attention_heads=2`", "--hidden 5 must be divisible by --heads 2"),
        ("`intermediate_size` and `num_hidden_layers`", "--mlp-width and --layers"),
    ],
)
def test_as_flags_words_parameters_as_flags(message, worded):
    assert as_flags(message) == worded


@pytest.mark.parametrize(
    "message",
    ["model.layers.3.mlp lacks `model.layers.3.mlp.up_proj`", "ΔW and `Δb`", "`W_ft − W`", "`Layers`", "no flag"],
)
def test_as_flags_leaves_other_text_alone(message):
    assert as_flags(message) == message


# ---- real errors, raised through the library and through the CLI ---------------------------------------------


def cli_error(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and result.stderr.count("\n") == 1, result.stderr
    return result.stderr.strip().removeprefix("icl-probe: error: ")


def test_toy_config_names_its_fields_and_the_cli_its_flags(tmp_path):
    with pytest.raises(UsageError) as e:
        toy.ToyConfig(num_hidden_layers=0)
    assert str(e.value) == "`num_hidden_layers`, `num_attention_heads` and `intermediate_size` must be ≥ 1"
    assert cli_error("regression", "train", "-o", tmp_path / "a", "--layers", "0") == (
        "--layers, --heads and --mlp-width must be ≥ 1"
    )
    with pytest.raises(UsageError, match=r"^`hidden_size=5` must be divisible by `num_attention_heads=2`$"):
        toy.ToyConfig(hidden_size=5, num_attention_heads=2)
    assert cli_error("regression", "train", "-o", tmp_path / "b", "--hidden", "5", "--heads", "2") == (
        "--hidden 5 must be divisible by --heads 2"
    )


def test_toy_training_names_its_arguments_and_the_cli_its_flags(tmp_path):
    with pytest.raises(UsageError) as e:
        toy.train(toy.ToyConfig(), 0)
    assert str(e.value) == "`steps`, `batch` and `checkpoints` must be ≥ 1 and `lr` > 0, not 0, 64, 10 and 0.001"
    assert cli_error("regression", "train", "-o", tmp_path, "--steps", "0") == (
        "--steps, --batch and --checkpoints must be ≥ 1 and --lr > 0, not 0, 64, 10 and 0.001"
    )


def test_an_existing_output_names_force_and_the_cli_its_flag(tiny_llama_dir, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("keep")
    with pytest.raises(InputError) as e:
        check_writable(out, force=False)
    assert str(e.value) == f"{out} already exists; pass `force=True` to overwrite it"
    line = cli_error("analyze", "-m", tiny_llama_dir, "--context", "ab\n", "--query", "a", "--json", out)
    assert line == f"{out} already exists; pass --force to overwrite it" and out.read_text() == "keep"


def test_export_options_name_their_values_and_the_cli_its_flags(tiny_llama_dir, tmp_path):
    with pytest.raises(UsageError) as e:
        resolve_residual("peft", "bias")
    assert str(e.value) == (
        '`format="peft"` needs `residual="fold"`: weights alone cannot add a bias to a block\'s output; '
        'drop `residual="bias"`'
    )
    options = ["--format", "peft", "--residual", "bias"]
    line = cli_error("export-patch", "-m", tiny_llama_dir, "-o", tmp_path / "x", *options)
    assert line == (
        "--format peft needs --residual fold: weights alone cannot add a bias to a block's output; drop --residual bias"
    )
