"""The docs name what the code has: every command and option that `-h` lists is in docs/cli.md, in its
command's section, and every JSON schema the package writes is in docs/schemas.md."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icl_probe.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*(w for a in args for w in a.split()), "-h"])
    assert result.exit_code == 0, result.output
    return result.output


def section(text: str, title: str) -> list[str]:
    """The lines of `text` under the `Title:` line of a click help page, up to the next unindented line."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return lines[start:end]


def commands() -> list[str]:
    """The command names `icl-probe -h` lists; a group's as "group sub" (e.g. "regression run")."""
    rows = section(help_text(), "Commands:")
    names = [row.split()[0] for row in rows if row.startswith("  ") and not row.startswith("   ")]
    return [name for group in names for name in subcommands(group)]


def subcommands(name: str) -> list[str]:
    text = help_text(name)
    if "Commands:" not in text.splitlines():
        return [name]
    rows = section(text, "Commands:")
    return [f"{name} {row.split()[0]}" for row in rows if row.startswith("  ") and not row.startswith("   ")]


def long_options(command: str) -> list[str]:
    """Every long option of a command's `-h`, read from the option rows (indented two spaces, starting with -)."""
    rows = [row for row in section(help_text(command), "Options:") if re.match(r"  -", row)]
    heads = [re.split(r"\s{2,}", row.strip())[0] for row in rows]
    return sorted({opt for head in heads for opt in re.findall(r"--[a-z][a-z0-9-]*", head)} - {"--help"})


def doc_section(command: str) -> str:
    """The text of docs/cli.md under the heading `## `icl-probe COMMAND...``, up to the next `## ` heading."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    match = re.search(rf"^## `icl-probe {re.escape(command)}\b[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/cli.md has no section '## `icl-probe {command}`'"
    return match.group(1)


def test_help_lists_the_commands():
    assert {"analyze", "dynamics", "tasks", "export-patch", "replay", "modules"} <= set(commands())


@pytest.mark.parametrize("command", commands())
def test_every_option_is_documented_in_its_section(command):
    options = long_options(command)
    assert options, f"no options parsed from 'icl-probe {command} -h'"
    documented = doc_section(command)
    missing = [opt for opt in options if not re.search(rf"`{re.escape(opt)}(?![\w-])", documented)]
    assert not missing, f"docs/cli.md, section {command}: options missing: {', '.join(missing)}"


@pytest.mark.parametrize("command", commands())
def test_every_command_is_in_the_overview(command):
    overview = (DOCS / "cli.md").read_text(encoding="utf-8").split("\n## ", 1)[0]
    assert re.search(rf"^icl-probe {re.escape(command)}\b", overview, re.M), command


def test_option_parser_reads_flags_pairs_and_metavars():
    options = long_options("dynamics")
    assert {"--gradient", "--no-gradient", "--finetune-steps", "--plot", "--max-memory", "--model"} <= set(options)
    assert "--help" not in options


def test_every_schema_the_package_writes_is_documented():
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "icl_probe").rglob("*.py"))
    schemas = set(re.findall(r"\"(icl-probe\.[a-z]+/\d+)\"", source))
    assert {"icl-probe.analysis/2", "icl-probe.dynamics/1", "icl-probe.tasks/1"} <= schemas
    documented = (DOCS / "schemas.md").read_text(encoding="utf-8")
    missing = sorted(s for s in schemas if s not in documented)
    assert not missing, f"docs/schemas.md does not describe {', '.join(missing)}"


def test_every_doc_link_points_to_a_file():
    for doc in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).is_file(), f"{doc.name} links to a missing {target}"


def test_docs_name_no_issue_numbers():
    """A reader has no issue tracker: the README and docs/ say what a figure or choice is, not which issue asked."""
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = doc.read_text(encoding="utf-8")
        found = re.findall(r"(?<!safetensors )\bissues? #?\d+", text, re.I)  # an upstream bug report is a reference
        assert not found, f"{doc.name} names {found}"


def architecture_paths() -> list[str]:
    """Every file path docs/architecture.md names in backticks (`cli/app.py`, `tests/test_layout.py`)."""
    return re.findall(r"`([\w/]+\.py)`", (DOCS / "architecture.md").read_text(encoding="utf-8"))


def test_architecture_names_only_files_that_exist():
    top = ("icl_probe/", "tests/", "benchmarks/")
    paths = architecture_paths()
    missing = [p for p in paths if not (ROOT / p if p.startswith(top) else ROOT / "icl_probe" / p).is_file()]
    assert len(paths) > 50 and not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_architecture_places_every_module():
    named = {p.removeprefix("icl_probe/") for p in architecture_paths()}
    modules = {str(p.relative_to(ROOT / "icl_probe")) for p in (ROOT / "icl_probe").rglob("*.py")} - {"__init__.py"}
    assert not modules - named, f"docs/architecture.md does not place: {sorted(modules - named)}"


def test_python_api_in_the_docs_is_exported():
    """Every `icl_probe.NAME` the README and docs/ call is a name the package exports."""
    import icl_probe

    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        called = set(re.findall(r"\bicl_probe\.(\w+)\(", doc.read_text(encoding="utf-8")))
        assert called <= set(icl_probe.__all__), f"{doc.name} calls {sorted(called - set(icl_probe.__all__))}"
