"""The exceptions icl-probe raises. The CLI turns each into one line on stderr."""


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
