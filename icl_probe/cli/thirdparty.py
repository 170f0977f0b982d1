"""Other libraries' warnings as icl-probe's own one-line `icl-probe: warning: …` on stderr.

Python warnings (torch, transformers' FutureWarnings…) print as three lines with a file path and a source
line, transformers logs through its own handler, and accelerate, peft and huggingface_hub log through
Python's last-resort handler; inside `one_line_warnings()` all of them become one line each, in the format
docs/errors.md promises. Messages listed in NOISE are dropped.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Noise: notes about the libraries' own machinery that a user of icl-probe can do nothing about.
# A kernel that falls back to its PyTorch reference (Mamba's and short convolutions' CUDA kernels on the CPU)
# computes the same values: nothing to act on.
NOISE: tuple[str, ...] = ("is falling back to its reference PyTorch implementation",)


def say(message: str) -> None:
    """Print one warning line on stderr (the current one, which tests may have replaced)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if text and not any(noise in text for noise in NOISE):
        print(f"icl-probe: warning: {text}", file=sys.stderr)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A `warnings.showwarning` that prints `icl-probe: warning: <library>: <message>` on one line."""
    path = (filename or "").replace("\\", "/")
    installed = re.search(r"(?:site|dist)-packages/([A-Za-z0-9_]+)", path)  # the package that warned, if installed
    say(f"{installed.group(1)}: {message}" if installed else str(message))


class OneLine(logging.Handler):
    """A logging handler for the libraries' loggers: warnings and errors as one icl-probe line each."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"{record.name.split('.')[0]}: {record.getMessage()}")


@contextmanager
def one_line_warnings(transformers: bool = True) -> Iterator[None]:
    """Within: Python warnings and transformers' log warnings print as one `icl-probe: warning:` line each.

    `transformers=False` leaves transformers' logger alone, for commands that never import it (`tasks`).
    """
    handler, root = OneLine(level=logging.WARNING), logging.getLogger()
    library = logging.getLogger("transformers")
    propagates = library.propagate
    if transformers:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.add_handler(handler)
        # transformers passes its records on to the root logger only where CI=1 is set: never twice here
        library.propagate = False
    root.addHandler(handler)  # the loggers that do: accelerate, peft, huggingface_hub
    shown = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        yield
    finally:
        warnings.showwarning = shown
        root.removeHandler(handler)
        if transformers:
            hf_logging.remove_handler(handler)
            hf_logging.enable_default_handler()
            library.propagate = propagates
