"""No third-party warning reaches the user: the KV cache goes through transformers' current keyword, and what
other libraries still say is one `icl-probe: warning:` line."""

import logging
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_model

import icl_probe
from icl_probe.cli.thirdparty import one_line_warnings
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples

CONTEXT, QUERY = "ab -> ba\ncd -> dc\n", "ef ->"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def caught():
    """Every Python warning and every transformers log warning raised inside, including once-only ones."""
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings fire again
    recorder = Recorder()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield raised, recorder.messages
    finally:
        hf_logger.removeHandler(recorder)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_generation_dynamics_and_replay_raise_no_warning(family, tmp_path):
    model, tokenizer = tiny_model(family, torch.float32).eval(), char_tokenizer(bos=False)
    examples = task_examples(builtin_task("antonyms"), DEFAULT_TEMPLATE, 2)
    query, patch = query_for(DEFAULT_TEMPLATE, "happy")[0], tmp_path / "p.safetensors"
    with caught() as (raised, logged):
        icl_probe.analyze(model, tokenizer, CONTEXT, QUERY, generate=3)
        icl_probe.track_dynamics(model, tokenizer, examples, query, finetune_steps=1, template=DEFAULT_TEMPLATE)
        icl_probe.export_patch(model, tokenizer, CONTEXT, QUERY, output=patch, store_context=True)
        icl_probe.replay_patch(model, tokenizer, patch, context=CONTEXT, generate=3)
        icl_probe.replay_patch(model, tokenizer, patch, context=CONTEXT, generate=3, recompute=True)
    assert [f"{w.category.__name__}: {w.message}" for w in raised] == [] and logged == []


def test_the_commands_print_no_third_party_text(tiny_llama_dir, tmp_path):
    """The real CLI in a fresh process, deprecation and future warnings made errors: stderr is ours alone."""
    patch = tmp_path / "p.safetensors"
    model = ["-m", tiny_llama_dir]
    runs = [
        ["dynamics", *model, "--task", "antonyms", "--demos", "2", "--query-input", "happy", "--finetune-steps", "1"],
        ["analyze", *model, "--context", CONTEXT, "--query", QUERY, "--generate", "3"],
        ["export-patch", *model, "--context", CONTEXT, "--query", QUERY, "-o", str(patch), "--store-context"],
        ["replay", str(patch), *model, "--context", CONTEXT, "--generate", "3"],
    ]
    script = (
        "import sys\nfrom icl_probe.cli import app\n"
        f"for args in {runs!r}:\n"
        "    try:\n        app(args, prog_name='icl-probe')\n"
        "    except SystemExit as e:\n        assert not e.code, (args, e.code)\n"
    )
    flags = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-W", "always::UserWarning"]
    done = subprocess.run([sys.executable, *flags, "-c", script], env=ENV, capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


@pytest.mark.parametrize("propagates", [False, True], ids=["default", "CI=1"])
def test_other_libraries_warnings_become_one_line(capsys, monkeypatch, propagates):
    """Once each, also where CI=1 makes transformers pass its records on to the root logger too."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", propagates)

    handlers = list(logging.getLogger().handlers)  # pytest's own
    shown, hf_handlers = warnings.showwarning, set(hf_logging.get_logger("transformers").handlers)
    with one_line_warnings():
        warnings.warn_explicit("`x` is deprecated\nand will go", FutureWarning, "/v/site-packages/torch/nn/m.py", 9)
        warnings.warn_explicit("no package here", UserWarning, "<frozen importlib._bootstrap>", 1)
        hf_logging.get_logger("transformers.models.llama").warning("the cache\nwas reset")
        logging.getLogger("accelerate.utils.modeling").warning("offloading to disk")
        logging.getLogger("accelerate.utils.modeling").info("not shown: below warning")
    assert capsys.readouterr().err.splitlines() == [
        "icl-probe: warning: torch: `x` is deprecated and will go",
        "icl-probe: warning: no package here",
        "icl-probe: warning: transformers: the cache was reset",
        "icl-probe: warning: accelerate: offloading to disk",
    ]
    assert logging.getLogger().handlers == handlers
    assert warnings.showwarning is shown and set(hf_logging.get_logger("transformers").handlers) == hf_handlers
    assert logging.getLogger("transformers").propagate is propagates
