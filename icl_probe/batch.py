"""`run_batch`: many prompts from a JSONL file through one loaded model, streamed to a JSONL file; `merge_parts`.

An input line is {"id", "context", "query"} or {"id", "task", "query_input", "demos"?, "template"?}, with
optional "layers" and "residual". Each output line is {"id", "result": <analysis document>} or {"id", "error"}.
Lines run in batches of B prompts (batched.py), written as each batch ends. A line is one os.write to an
O_APPEND file, then fsync: a killed run loses at most the batch in progress, and
a rerun cuts away a torn last line, skips the ids already done and runs again those with an error line.
Processes split the input by line (index % world_size == rank), each into its own part `NAME.rank{R}.jsonl`;
`merge_parts` joins the parts.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BATCH_SIZE", "BATCH_RESULTS", "part_path", "check_batch_paths", "check_batch_size", "written_ids",
    "drop_errors", "line_writer", "safe_name", "run_batch", "merge_parts"
]  # fmt: skip

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .analysis import analyze
from .batched import analyze_rows
from .collector import frozen_objects
from .errors import IclProbeError, InputError, UsageError
from .export import export_patch
from .fileio import atomic_write, check_writable
from .inputs import reencode
from .tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples

PROMPT_KEYS = ("context", "query")
TASK_KEYS = ("task", "query_input", "demos", "template")
KNOWN_KEYS = ("id", *PROMPT_KEYS, *TASK_KEYS, "layers", "residual")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 120  # characters of a patch file's stem; file systems allow 255 bytes

DEFAULT_BATCH_SIZE = 32  # prompts per forward pass; long or mixed-length prompts split further (batched.pass_parts)
BATCH_RESULTS = "results.jsonl"  # export-patch --batch FOLDER: the result lines beside the patches


@dataclass(frozen=True)
class Job:
    """One input line with a usable, first-seen id; `line` counts from 1, `fields` is the parsed object."""

    line: int
    id: str | int
    fields: dict


@dataclass(frozen=True)
class BadLine:
    """An input line without a usable id (not JSON, no id, a repeated id): reported, never run."""

    line: int
    message: str


Warn = Callable[[str], None]
Progress = Callable[[int, int], None]


# --- input ----------------------------------------------------------------------------------------------------


def read_jobs(path: str | Path) -> tuple[list[Job], list[BadLine]]:
    """The input file's jobs (first occurrence of each id) and its bad lines; blank lines are ignored."""
    jobs: list[Job] = []
    bad: list[BadLine] = []
    first: dict[str | int, int] = {}
    for number, text in enumerate(read_lines(path), start=1):
        if not text.strip():
            continue
        fields, problem = parse_line(text)
        if problem is None and fields["id"] in first:
            earlier = first[fields["id"]]
            problem = f"the id {show_id(fields['id'])} was already used on line {earlier}; give each line its own id"
        if problem is not None:
            bad.append(BadLine(number, f"{path}: line {number}: {problem}; line skipped"))
            continue
        first[fields["id"]] = number
        jobs.append(Job(number, fields["id"], fields))
    return jobs, bad


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "not found"
        raise InputError(f"batch input {path} {state}; give a JSONL file with one prompt object per line")
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"batch input {path} is not UTF-8 ({e.reason} at byte {e.start}); {reencode(path)}") from None


def parse_line(text: str) -> tuple[dict | None, str | None]:
    """(the object, None) or (None, what is wrong with the line)."""
    try:
        fields = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return None, f"not JSON ({getattr(e, 'msg', 'nested too deeply')})"
    if not isinstance(fields, dict):
        return None, 'not a JSON object; write {"id": ..., "context": ..., "query": ...}'
    if "id" not in fields:
        return None, 'no "id"; give each line an "id" (a string or an integer)'
    if not usable_id(fields["id"]):
        return None, f'the "id" {json.dumps(fields["id"])[:40]} is not a non-empty string or an integer'
    return fields, None


def usable_id(value: object) -> bool:
    return (isinstance(value, str) and value != "") or (isinstance(value, int) and not isinstance(value, bool))


def show_id(value: str | int) -> str:
    return json.dumps(value, ensure_ascii=False)


def line_prompt(fields: dict) -> tuple[str, str]:
    """(context, query) of a line: given as text, or built from a built-in task's first `demos` pairs."""
    unknown = [key for key in fields if key not in KNOWN_KEYS]
    if unknown:
        raise InputError(f'unknown key "{unknown[0]}"; a line takes {", ".join(KNOWN_KEYS)}')
    if "task" in fields:
        if any(key in fields for key in PROMPT_KEYS):
            raise InputError('give "context" and "query", or "task" and "query_input", not both')
        return task_prompt(fields)
    if any(key in fields for key in TASK_KEYS):
        raise InputError('"query_input", "demos" and "template" need a "task"')
    for key in PROMPT_KEYS:
        if not isinstance(fields.get(key), str):
            raise InputError(
                f'"{key}" is missing or not a string; give "context" and "query", or "task" and "query_input"'
            )
    return fields["context"], fields["query"]


def task_prompt(fields: dict) -> tuple[str, str]:
    for key in ("task", "query_input"):
        if not isinstance(fields.get(key), str):
            raise InputError(f'"{key}" is missing or not a string; a task line takes "task" and "query_input"')
    template = fields.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str):
        raise InputError(f'"template" is {json.dumps(template)}; give a string such as {json.dumps(DEFAULT_TEMPLATE)}')
    demos = fields.get("demos")
    if demos is not None and (not isinstance(demos, int) or isinstance(demos, bool)):
        raise InputError(f'"demos" is {json.dumps(demos)}; give the number of demonstrations as an integer')
    examples = task_examples(builtin_task(fields["task"]), template, demos)
    query, _ = query_for(template, fields["query_input"])
    return "".join(e.text for e in examples), query


def line_options(fields: dict, layers, residual: str) -> tuple[object, str]:
    """The line's "layers" and "residual", or the run's defaults."""
    layers = fields.get("layers", layers)
    ints = isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    if not (isinstance(layers, str | int) and not isinstance(layers, bool) or ints):
        raise InputError(f'"layers" is {json.dumps(layers)}; give a spec such as "all", "3,7", "-4:" or a list of ints')
    residual = fields.get("residual", residual)
    if not isinstance(residual, str):
        raise InputError(f'"residual" is {json.dumps(residual)}; give "bias" or "fold"')
    return layers, residual


# --- output ---------------------------------------------------------------------------------------------------


def part_path(output: str | Path, rank: int, world_size: int) -> Path:
    """Where this process writes: `output` itself, or NAME.rank{R}.SUFFIX beside it when there are many."""
    output = Path(output)
    if world_size == 1:
        return output
    return output.with_name(f"{output.stem}.rank{rank}{output.suffix}")


def check_batch_paths(input_path: str | Path, output: str | Path, patches: str | Path | None = None) -> None:
    """Refuse a missing input, an unwritable output or an unusable patch folder before the model is loaded."""
    read_lines(input_path)
    if str(output) != "-":
        check_writable(output, force=True)  # an existing output is resumed, not overwritten
    if patches is not None:
        patches = Path(patches)
        if patches.exists() and not patches.is_dir():
            raise InputError(f"`patches` {patches} is a file; give a folder (it is created if missing)")
        if not patches.parent.is_dir():
            raise InputError(f"cannot create the patch folder {patches}: {patches.parent} does not exist")


def written_ids(path: Path, warn: Warn) -> tuple[set, set]:
    """(ids with a result, ids with an error) in the output, after cutting away a torn last line (a run killed
    mid-write)."""
    if not path.exists():
        return set(), set()
    ids, failed, bad, start, last = set(), set(), [], 0, 0
    with open(path, "rb") as f:
        for raw in f:
            doc = parse_output_line(raw)
            if doc is None:
                bad.append(start)
            else:
                (failed if "error" in doc else ids).add(doc["id"])
            last, start = start, start + len(raw)
    if bad and bad[-1] == last:
        os.truncate(path, last)
        warn(f"{path}: cut away a torn last line ({start - bad.pop()} bytes) left by an interrupted run")
    for offset in bad:
        warn(f"{path}: the line at byte {offset} is not a result line; it is kept but its id is not counted as done")
    return ids, failed - ids


def drop_errors(path: Path, ids: set) -> None:
    """Rewrite the output (atomically) without the error lines of `ids`, which are about to be run again."""
    with open(path, "rb") as f:
        kept = [raw for raw in f if not is_error_of(parse_output_line(raw), ids)]
    atomic_write(path, lambda tmp: tmp.write_bytes(b"".join(kept)))


def is_error_of(doc: dict | None, ids: set) -> bool:
    return doc is not None and "error" in doc and doc["id"] in ids


def parse_output_line(raw: bytes) -> dict | None:
    """The line as {"id", ...} if it is one complete JSON line with an id, else None."""
    if not raw.endswith(b"\n"):
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) and usable_id(doc.get("id")) else None


@contextmanager
def line_writer(path: str | Path) -> Iterator[Callable[[dict], None]]:
    """write(doc): the doc as one JSON line in one os.write to an O_APPEND file, then fsync; '-' is stdout."""
    to_stdout = str(path) == "-"
    fd = 1 if to_stdout else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(doc: dict) -> None:
        data = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
        while data:  # a regular file takes it in one call; the loop only guards against a short write
            data = data[os.write(fd, data) :]
        if not to_stdout:
            os.fsync(fd)

    try:
        yield write
    finally:
        if not to_stdout:
            os.close(fd)


# --- patches --------------------------------------------------------------------------------------------------


def patch_names(jobs: list[Job]) -> dict[str | int, str]:
    """Each id's patch file name, or (for an id that collides with an earlier one after sanitising) an error."""
    names: dict[str | int, str] = {}
    owner: dict[str, Job] = {}
    for job in jobs:
        name = safe_name(job.id) + ".safetensors"
        taken = owner.get(name.lower())  # case-insensitive file systems (macOS, Windows) would merge them
        if taken is None:
            owner[name.lower()] = job
            names[job.id] = name
        else:
            names[job.id] = (
                f"ERROR: the id {show_id(job.id)} gives the same patch file name {name} as the id "
                f"{show_id(taken.id)} on line {taken.line}; give ids that differ in letters, digits, '.', '-' or '_'"
            )
    return names


def safe_name(value: str | int) -> str:
    """The id as a file stem: runs of other characters become '_', no leading dot, at most MAX_NAME characters."""
    return SAFE_NAME.sub("_", str(value)).lstrip(".")[:MAX_NAME] or "_"


# --- the run --------------------------------------------------------------------------------------------------


@frozen_objects()
def run_batch(
    model,
    tokenizer,
    input_path: str | Path,
    output_path: str | Path,
    layers: str | list[int] | None = "all",
    residual: str = "bias",
    top_k: int = 5,
    gradient: bool = False,
    per_layer_ablation: bool = False,
    text: bool = True,
    patches: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    on_progress: Progress | None = None,
    on_warning: Warn | None = None,
    retry_failed: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Analyze this rank's share of the input's lines, appending one result or error line each to the output.

    Ids already in the output with a result are skipped; an id with an error line is run again (its error
    line removed first) unless `retry_failed` is False, when it is skipped too. With `patches`, each line's
    native patch is also written to PATCHES/<id>.safetensors (replacing one left by an interrupted run).
    `output_path` is this process's file (see `part_path`), or '-' for stdout. Lines run `batch_size` at a
    time as the rows of shared forward passes (batched.py); a batch that fails runs again one line at a time,
    so a bad line fails alone. Returns the counts: done, skipped, failed, retried, bad_lines.
    """
    check_share(rank, world_size, output_path)
    check_batch_size(batch_size)
    check_patch_options(patches, top_k, gradient, per_layer_ablation)
    check_batch_paths(input_path, output_path, patches)
    warnings: list[str] = []
    warn = collecting(warnings, on_warning)
    jobs, mine = share(input_path, rank, world_size, warn)
    todo, retried = pending(mine, output_path, retry_failed, warn)
    names = patch_folder(patches, jobs)
    options = dict(layers=layers, residual=residual, top_k=top_k, gradient=gradient,
                   per_layer_ablation=per_layer_ablation, text=text)  # fmt: skip

    def run(chunk: list[Job], pending_ids: set) -> list[dict]:
        return run_chunk(model, tokenizer, chunk, options, patches, names, input_path, pending_ids)

    counts = write_batches(mine, todo, batch_size, output_path, run, on_progress)
    return {"input": str(input_path), "output": str(output_path), "rank": rank, "world_size": world_size,
            "lines": len(mine), "done": counts["done"], "skipped": len(mine) - len(todo), "failed": counts["failed"],
            "retried": len(retried), "bad_lines": len(warnings), "warnings": warnings}  # fmt: skip


def share(input_path: str | Path, rank: int, world_size: int, warn: Warn) -> tuple[list[Job], list[Job]]:
    """(every job of the input, this rank's share of them: index % world_size == rank); warns of its bad lines."""
    jobs, bad = read_jobs(input_path)
    for b in bad:
        if (b.line - 1) % world_size == rank:
            warn(b.message)
    return jobs, [job for job in jobs if (job.line - 1) % world_size == rank]


def patch_folder(patches: str | Path | None, jobs: list[Job]) -> dict | None:
    """With `patches`: create the folder, and name each job's patch file (see `patch_names`)."""
    if patches is None:
        return None
    Path(patches).mkdir(exist_ok=True)
    return patch_names(jobs)


def collecting(warnings: list[str], on_warning: Warn | None) -> Warn:
    """warn(message): keep the message in `warnings` and pass it to `on_warning`."""

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    return warn


def write_batches(mine: list[Job], todo: list[Job], batch_size: int, output_path, run, on_progress) -> dict:
    """Append `run(chunk, pending ids)`'s lines for each slice of `batch_size` jobs with a pending one; the counts of
    lines done and failed."""
    counts = {"done": 0, "failed": 0}
    progress = on_progress or (lambda done, total: None)
    progress(len(mine) - len(todo), len(mine))
    with line_writer(output_path) as write:
        pending_ids = {job.id for job in todo}
        for start in range(0, len(mine), batch_size):
            # batches are fixed slices of this rank's lines, whatever is done already: a resumed line is computed
            # in the same batch as in an uninterrupted run, so its result is the same to the last bit
            chunk = mine[start : start + batch_size]
            if not any(job.id in pending_ids for job in chunk):
                continue
            for line in run(chunk, pending_ids):
                write(line)
                counts["failed" if "error" in line else "done"] += 1
            progress(len(mine) - len(todo) + counts["done"] + counts["failed"], len(mine))
    return counts


def pending(mine: list[Job], output_path: str | Path, retry_failed: bool, warn: Warn) -> tuple[list[Job], set]:
    """(the jobs to run, the ids among them run again after an error): not those with a result in the output."""
    done, failed = (set(), set()) if str(output_path) == "-" else written_ids(Path(output_path), warn)
    retried = {job.id for job in mine if job.id in failed} if retry_failed else set()
    if retried:
        drop_errors(Path(output_path), retried)
    return [job for job in mine if job.id not in done and (job.id not in failed or job.id in retried)], retried


def check_share(rank: int, world_size: int, output_path: str | Path) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK {rank} and WORLD_SIZE {world_size} do not fit: need 0 <= RANK < WORLD_SIZE")
    if world_size > 1 and str(output_path) == "-":
        raise UsageError("with many processes each writes its own file; give `output=FILE.jsonl`, not '-'")


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"`batch_size` must be 1 or more, not {batch_size!r}")


def check_patch_options(patches, top_k: int, gradient: bool, per_layer_ablation: bool) -> None:
    """A patch comes with export-patch's analysis (top 5, no gradient, no per-layer ablation)."""
    if patches is not None and (top_k != 5 or gradient or per_layer_ablation):
        raise UsageError("`patches` reports export-patch's analysis; drop `top_k`, `gradient` and `layer_ablation`")


def run_chunk(model, tokenizer, chunk: list[Job], options: dict, patches, names, input_path, pending: set) -> list:
    """The output lines of the `pending` jobs of a batch, in order: the jobs that share layers and residual run as
    the rows of one `analyze_rows` (done ones too, so that each row's batch is as before); a line that cannot be
    read fails alone, and a group that fails runs its pending jobs one at a time."""
    if len(chunk) == 1:
        return [run_job(model, tokenizer, chunk[0], options, patches, names, input_path)]
    lines: dict[int, dict] = {}
    groups: dict[str, list[tuple]] = {}  # (index in chunk, job, (context, query), (layers, residual))
    for n, job in enumerate(chunk):
        try:
            prompt = line_prompt(job.fields)
            layers, residual = line_options(job.fields, options["layers"], options["residual"])
            if patches is not None and names[job.id].startswith("ERROR: "):
                raise InputError(names[job.id].removeprefix("ERROR: "))
        except IclProbeError as e:
            lines[n] = error_line(job, e, input_path)
            continue
        groups.setdefault(json.dumps([layers, residual]), []).append((n, job, prompt, (layers, residual)))
    for group in groups.values():
        for n, line in run_group(model, tokenizer, group, options, patches, names, input_path, pending):
            lines[n] = line
    return [lines[n] for n in range(len(chunk)) if chunk[n].id in pending]


def run_group(model, tokenizer, group: list, options: dict, patches, names, input_path, pending: set) -> list:
    """(index, line) for a group of jobs with the same layers and residual, batched, or one at a time on failure
    (only the pending ones then)."""
    layers, residual = group[0][3]
    try:
        results = analyze_rows(model, tokenizer, [prompt for _, _, prompt, _ in group], layers=layers,
                               residual=residual, top_k=options["top_k"], gradient=options["gradient"],
                               per_layer_ablation=options["per_layer_ablation"])  # fmt: skip
    except IclProbeError:  # e.g. one prompt too long or not finite: each line then reports its own error
        return [(n, run_job(model, tokenizer, job, options, patches, names, input_path))
                for n, job, _, _ in group if job.id in pending]  # fmt: skip
    lines = []
    for (n, job, (context, query), _), result in zip(group, results):
        if job.id not in pending:
            continue
        if patches is None:
            lines.append((n, {"id": job.id, "result": result.to_dict(text=options["text"])}))
            continue
        try:
            export = export_patch(model, tokenizer, context, query, output=Path(patches) / names[job.id],
                                  residual=residual, layers=layers, force=True, analysis=result)  # fmt: skip
            lines.append((n, {"id": job.id, "result": result.to_dict(text=options["text"]), "patch": export.to_dict()}))
        except IclProbeError as e:
            lines.append((n, error_line(job, e, input_path)))
    return lines


def error_line(job: Job, e: Exception, input_path) -> dict:
    return {"id": job.id, "error": f"{input_path}: line {job.line}: {one_line(str(e))}"}


def run_job(model, tokenizer, job: Job, options: dict, patches, names, input_path) -> dict:
    """One output line: {"id", "result"} (and "patch" with `patches`), or {"id", "error"} naming the line."""
    try:
        context, query = line_prompt(job.fields)
        layers, residual = line_options(job.fields, options["layers"], options["residual"])
        if patches is None:
            result = analyze(model, tokenizer, context, query, layers=layers, residual=residual,
                             top_k=options["top_k"], gradient=options["gradient"],
                             per_layer_ablation=options["per_layer_ablation"])  # fmt: skip
            return {"id": job.id, "result": result.to_dict(text=options["text"])}
        if names[job.id].startswith("ERROR: "):
            raise InputError(names[job.id].removeprefix("ERROR: "))
        export = export_patch(model, tokenizer, context, query, output=Path(patches) / names[job.id],
                              residual=residual, layers=layers, force=True)  # fmt: skip
        return {"id": job.id, "result": export.analysis.to_dict(text=options["text"]), "patch": export.to_dict()}
    except IclProbeError as e:
        return error_line(job, e, input_path)


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


# --- merging --------------------------------------------------------------------------------------------------


def part_files(output: str | Path) -> list[Path]:
    """NAME.rank{R}.SUFFIX beside `output`, in rank order."""
    output = Path(output)
    pattern = re.compile(re.escape(output.stem) + r"\.rank(\d+)" + re.escape(output.suffix))
    found = [
        (int(m.group(1)), p) for p in output.parent.glob(f"{output.stem}.rank*") if (m := pattern.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def merge_parts(output: str | Path, input_path: str | Path | None = None, force: bool = False) -> dict:
    """Join the part files of `output` into `output` (atomically), refusing duplicated ids and, given the input,
    missing or unexpected ones. Lines are copied byte for byte, in input order when the input is given.
    """
    output = Path(output)
    parts = part_files(output)
    if not parts:
        raise InputError(f"no part files {output.stem}.rank*{output.suffix} beside {output}; run the batch with "
                         f"`output={output}` under torchrun first")  # fmt: skip
    check_writable(output, force)
    lines, warnings = read_parts(parts)
    if input_path is not None:
        lines = in_input_order(lines, input_path)
    atomic_write(output, lambda tmp: tmp.write_bytes(b"".join(raw for raw, _ in lines.values())))
    errors = sum(1 for _, doc in lines.values() if "error" in doc)
    return {"output": str(output), "parts": [str(p) for p in parts], "lines": len(lines),
            "results": len(lines) - errors, "errors": errors,
            "checked_against": None if input_path is None else str(input_path), "warnings": warnings}  # fmt: skip


def read_parts(parts: list[Path]) -> tuple[dict, list[str]]:
    """{id: (raw line, doc)} over all parts; a torn last line is left out with a warning; a repeated id refuses."""
    lines: dict = {}
    where: dict = {}
    warnings: list[str] = []
    for part in parts:
        raws = part.read_bytes().splitlines(keepends=True)
        for number, raw in enumerate(raws, start=1):
            doc = parse_output_line(raw)
            if doc is None and number == len(raws):
                warnings.append(f"{part}: left out a torn last line (line {number}) from an interrupted run")
                continue
            if doc is None:
                raise InputError(f"{part}: line {number} is not a result line; fix or delete it, then merge again")
            if doc["id"] in lines:
                raise InputError(f"the id {show_id(doc['id'])} is in {where[doc['id']]} and in {part}: line {number}; "
                                 "delete one of the two lines, then merge again")  # fmt: skip
            lines[doc["id"]], where[doc["id"]] = (raw, doc), f"{part}: line {number}"
    return lines, warnings


def in_input_order(lines: dict, input_path: str | Path) -> dict:
    """The lines reordered as the input's ids; a missing or unexpected id refuses the merge."""
    jobs, _ = read_jobs(input_path)
    wanted = [job.id for job in jobs]
    missing = [i for i in wanted if i not in lines]
    unexpected = set(lines) - set(wanted)
    if missing:
        raise InputError(f"{len(missing)} of the {len(wanted)} ids of {input_path} are in no part (e.g. "
                         f"{', '.join(map(show_id, missing[:3]))}); rerun the batch with the same WORLD_SIZE to "
                         "finish them, then merge again")  # fmt: skip
    if unexpected:
        shown = ", ".join(map(show_id, sorted(unexpected, key=str)[:3]))
        raise InputError(f"{len(unexpected)} ids in the parts are not in {input_path} (e.g. {shown}); "
                         "give the input the batch ran on")  # fmt: skip
    return {i: lines[i] for i in wanted}
