"""The exceptions icl-probe raises. The CLI turns each into one line on stderr.

Messages name the library's parameters, in backticks: `` `layers` `` alone, or with the value that fixes the
problem, as Python would write it (`` `positions="all"` ``, `` `generate=0` ``, `` `store_context=True` ``).
The CLI's one boundary (cli/app.py `as_flags`) words each as its flag: the name with dashes for underscores,
then the value without quotes (nothing for `=True`, a `no-` prefix for `=False`).
"""


class IclProbeError(Exception):
    """Base of every error icl-probe raises on purpose; the message says what, where and how to fix it."""

    exit_code = 1


class UsageError(IclProbeError):
    """A bad option or argument value (exit code 2)."""

    exit_code = 2


class InputError(IclProbeError):
    """A context, query or file that cannot be used."""


class ModelError(IclProbeError):
    """A model that cannot be loaded or is not supported."""


class PatchError(IclProbeError):
    """A patch file that is malformed, tampered with, or made for another model."""


class MathError(IclProbeError):
    """A degenerate case of the update math: a tiny ‖z0‖ or non-finite activations."""
