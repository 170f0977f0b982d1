"""The study across scale that README.md and docs/results/scale/report.md show is the committed cells' study.

docs/results/scale/ holds what `icl-probe study` wrote (spec.json, the journal cells.jsonl, summary.json,
report.md, accuracy.png). These tests pool the journal again and require the committed summary, re-render the
report and the README's overview from it and require the committed text, so no table can drift from its cells.
That the cells themselves reproduce is tests/test_figures_study.py's (the figures tier, `./run test-figures`).
"""

import json
import re
from pathlib import Path

from icl_probe.study import make_spec, read_journal
from icl_probe.studyreport import overview_lines, report_lines, summarise

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "scale"


def committed() -> tuple:
    spec = make_spec(json.loads((RESULTS / "spec.json").read_text(encoding="utf-8")))
    summary = json.loads((RESULTS / "summary.json").read_text(encoding="utf-8"))
    return spec, read_journal(RESULTS / "cells.jsonl"), summary


def test_the_summary_pools_the_committed_cells():
    spec, lines, summary = committed()
    fresh = json.loads(json.dumps(summarise(spec, lines)))
    fresh["environment"], fresh["icl_probe_version"] = summary["environment"], summary["icl_probe_version"]
    assert fresh == summary
    assert summary["cells"]["done"] == len(spec.cells()) and summary["cells"]["failed"] == 0


def test_the_report_is_the_summarys():
    _, _, summary = committed()
    expected = "\n".join(report_lines(summary, "accuracy.png")) + "\n"
    assert (RESULTS / "report.md").read_text(encoding="utf-8") == expected
    assert (RESULTS / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_readme_shows_the_overview():
    """README.md's study tables are the report's overview (every task pooled per model), word for word."""
    _, _, summary = committed()
    readme = (RESULTS.parents[2] / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"<!-- study-overview -->\n(.*?)\n<!-- /study-overview -->", readme, re.S)
    assert shown, "README.md has no study-overview block"
    overview = overview_lines(summary)[4:]  # past the heading and the note, which the README words itself
    assert shown.group(1).strip() == "\n".join(overview).strip()


def test_the_findings_quote_the_tables():
    """Every decimal figure of docs/study.md's findings is a cell (or part of one) of the overview it sums up."""
    text = (RESULTS.parents[1] / "study.md").read_text(encoding="utf-8")
    findings = re.search(r"<!-- study-findings -->\n(.*?)<!-- /study-findings -->", text, re.S).group(1)
    _, _, summary = committed()
    overview = "\n".join(overview_lines(summary)).replace("-", "−")
    names = {"0.5B", "1.5B", "3.1"}  # model sizes and the proposition's number
    figures = re.findall(r"−?\d+\.\d+(?:e−\d+|e-\d+)?(?: \[\d\.\d+, \d\.\d+\])?", findings)
    quoted = [f for f in figures if f not in names and not re.fullmatch(r"\d\.\dB?", f)]
    assert len(quoted) > 20
    missing = [f for f in quoted if f.replace("-", "−") not in overview]
    assert not missing, f"figures not in the overview: {missing}"
