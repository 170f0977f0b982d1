"""Progress of long jobs: the library's counts match the work done; the CLI draws them as bars on stderr, 80
columns wide, and draws none with `--json -`."""

import json
import re
from collections import defaultdict
from functools import partial

import pytest
import torch
from helpers import run
from tiny import char_tokenizer, tiny_model

import icl_probe
from icl_probe import models
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples
from icl_probe.transfer import transfer

CONTEXT, QUERY = "ab -> ba\ncd -> dc\n", "ef ->"
TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "80", "NO_COLOR": "1"}  # rich draws as on an 80-column terminal
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Recorder:
    """A progress callback that keeps every (done, total) per job."""

    def __init__(self):
        self.calls = defaultdict(list)

    def __call__(self, job, done, total):
        self.calls[job].append((done, total))

    def check(self, job: str, total: int, steps: int) -> None:
        """The job started at 0, counted one step at a time up to `total`, and reported `steps` steps."""
        calls = self.calls[job]
        assert calls[0] == (0, total) and calls[-1] == (total, total), calls
        assert all(b[0] > a[0] for a, b in zip(calls, calls[1:])), calls
        assert len(calls) == steps + 1, calls


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", torch.float32), char_tokenizer(bos=False)


def test_generation_counts_every_token(tiny):
    seen = Recorder()
    result = icl_probe.analyze(*tiny, CONTEXT, QUERY, generate=4, progress=seen)
    seen.check("generated tokens", 4, len(result.generation.context_ids))


def test_replay_counts_the_greedy_runs_and_the_comparison(tiny, tmp_path):
    patch = tmp_path / "p.safetensors"
    icl_probe.export_patch(*tiny, CONTEXT, QUERY, output=patch)
    seen = Recorder()
    result = icl_probe.replay_patch(*tiny, patch, context=CONTEXT, generate=3, progress=seen)
    runs = [result.generated[k]["token_ids"] for k in ("patched", "no_context", "context")]
    seen.check("greedy tokens", 9, sum(len(ids) for ids in runs))  # patched, query alone, with context
    seen.check("generated tokens", 3, len(result.generation.context_ids))
    nothing = Recorder()
    icl_probe.replay_patch(*tiny, patch, context=CONTEXT, progress=nothing)
    assert nothing.calls == {}  # no bar for a job of no steps


def test_finetuning_counts_its_steps(tiny):
    seen = Recorder()
    examples = task_examples(builtin_task("antonyms"), DEFAULT_TEMPLATE, 2)
    query = query_for(DEFAULT_TEMPLATE, "happy")[0]
    doc = icl_probe.track_dynamics(*tiny, examples, query, finetune_steps=3, template=DEFAULT_TEMPLATE, progress=seen)
    seen.check("fine-tuning steps", 3, len(doc.finetune["steps"]))


@pytest.mark.slow
def test_transfer_counts_queries_and_methods(tiny):
    seen = Recorder()
    doc = transfer(*tiny, builtin_task("antonyms"), demos=2, calibration=[1, 2], heldout=2, progress=seen).to_dict()
    queries = len(doc["calibration_inputs"]) + len(doc["heldout_inputs"])
    seen.check("queries", queries, queries)
    # per calibration size K: K single patches, then the mean, joint and thought patches and the task vector
    seen.check("methods", (1 + 4) + (2 + 4), (1 + 4) + (2 + 4))


def test_gguf_conversion_counts_the_tensors_transformers_loops_over():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    seen, tensors = Recorder(), [f"blk.{i}.weight" for i in range(7)]
    with models.no_gguf_bar(seen):
        assert list(gguf_utils.tqdm(tensors, desc="Converting and de-quantizing GGUF tensors...")) == tensors
    seen.check("GGUF tensors", 7, 7)


def frames(stderr: str) -> list[str]:
    """The lines rich drew on the terminal, without escape codes."""
    return [line for line in re.split(r"[\r\n]", ANSI.sub("", stderr)) if line.strip()]


tty = partial(run, env=TERMINAL, check=True)  # the CLI on an 80-column terminal; it must exit 0


COMMANDS = {
    "analyze --generate": (["analyze", "--context", CONTEXT, "--query", QUERY, "--generate", "3"],
                           "generated tokens", 3),
    "dynamics --finetune-steps": (["dynamics", "--task", "antonyms", "--demos", "2", "--query-input", "happy",
                                   "--finetune-steps", "2", "--no-gradient"], "fine-tuning steps", 2),
    "transfer": (["transfer", "--task", "antonyms", "--demos", "2", "--calibration", "1", "--heldout", "2"],
                 "methods", 5),
}  # fmt: skip


@pytest.mark.parametrize("name", COMMANDS)
def test_bars_with_counts_and_eta_on_stderr_and_none_with_json_stdout(name, tiny_llama_dir):
    args, job, total = COMMANDS[name]
    drawn = frames(tty(*args, "-m", tiny_llama_dir).stderr)
    bars = [line for line in drawn if line.lstrip().startswith(job)]
    assert bars and re.search(rf"\b{total}/{total} eta \d+:\d\d:\d\d$", bars[-1]), drawn
    assert all(len(line) <= 80 for line in drawn), drawn
    quiet = tty(*args, "-m", tiny_llama_dir, "--json", "-")
    assert job not in quiet.stderr and "eta" not in quiet.stderr
    json.loads(quiet.stdout)


def test_batch_draws_a_bar_of_lines(tiny_llama_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "context": CONTEXT, "query": QUERY}) + "\n" for i in range(2)))
    drawn = frames(tty("batch", source, "-o", tmp_path / "out.jsonl", "-m", tiny_llama_dir, "--layers", "-1").stderr)
    assert any(re.search(r"^\s*lines .* 2/2 eta", line) for line in drawn), drawn
    to_stdout = tty("batch", source, "-o", "-", "-m", tiny_llama_dir, "--layers", "-1")
    assert not any(re.search(r"^\s*lines .*/2 eta", line) for line in frames(to_stdout.stderr))


def test_no_bars_when_stderr_is_not_a_terminal(tiny_llama_dir):
    args, job, _ = COMMANDS["analyze --generate"]
    assert job not in run(*args, "-m", tiny_llama_dir, check=True).stderr


def test_eta_is_known_when_each_step_takes_minutes():
    """Steps a minute apart (a real model's transfer methods): the ETA is the remaining steps at the mean speed."""
    from rich.console import Console

    from icl_probe.cli.progress import Work

    clock = [0.0]
    work = Work(Console(force_terminal=True, width=80), "Scoring…", counted=True)
    work.get_time = lambda: clock[0]
    for done in range(3):
        work("methods", done, 4)
        clock[0] += 60.0
    clock[0] -= 60.0
    assert work.tasks[0].time_remaining == pytest.approx(2 * 60.0)  # 2 steps left at 1 step a minute


def test_toy_training_counts_its_steps():
    from icl_probe import toy

    seen = Recorder()
    toy.train(toy.ToyConfig(d=2, n=3, intermediate_size=8), steps=4, batch=4, checkpoints=2, progress=seen)
    seen.check("training steps", 4, 4)


def test_regression_and_dynamics_trials_count_their_trials(tmp_path):
    from icl_probe import toy
    from icl_probe.dynamics import dynamics_trials
    from icl_probe.regression import regression
    from icl_probe.tasks import Task

    model, states = toy.train(toy.ToyConfig(d=2, n=3, intermediate_size=8), steps=2, batch=4, checkpoints=1)
    seen = Recorder()
    regression(str(toy.save(model, states, tmp_path / "toy")), trials=3, lr=0.05, val_trials=2, progress=seen)
    seen.check("trials", 3, 3)
    task = Task("tiny", (("ab", "c"), ("de", "f"), ("gh", "i"), ("jk", "l")))
    seen = Recorder()
    dynamics_trials(tiny_model("llama"), char_tokenizer(), task, "{input} {output}\n", 2, 3, progress=seen)
    seen.check("trials", 3, 3)


def test_heads_counts_its_stages():
    from icl_probe.heads import score_heads

    seen = Recorder()
    score_heads(tiny_model("llama"), char_tokenizer(), CONTEXT, QUERY, knockout=(1,), draws=1, progress=seen)
    seen.check("stages (split, scores, knockout)", 3, 3)
