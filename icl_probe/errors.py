"""The exceptions icl-probe raises. The CLI turns each into one line on stderr.

Messages name the library's parameters, in backticks: `` `layers` `` alone, or with the value that fixes the
problem, as Python would write it (`` `positions="all"` ``, `` `generate=0` ``, `` `store_context=True` ``).
The CLI's one boundary (cli/app.py `as_flags`) words each as its flag: the name with dashes for underscores,
then the value without quotes (nothing for `=True`, a `no-` prefix for `=False`).
"""

__all__ = ["IclProbeError", "UsageError", "InputError", "ModelError", "PatchError", "MathError"]


class IclProbeError(Exception):
    """Base of every error icl-probe raises on purpose; the message says what, where and how to fix it.

    Example:
        >>> try: icl_probe.analyze(model, tokenizer, context="", query="")
        ... except icl_probe.IclProbeError as e: print(type(e).__name__, e.exit_code)  # the CLI's exit code
        InputError 1
    """

    exit_code = 1


class UsageError(IclProbeError):
    """A bad option or argument value (exit code 2).

    Example:
        >>> try: icl_probe.analyze(model, tokenizer, positions="first")
        ... except icl_probe.UsageError as e: print(e.exit_code)  # the message names `positions` and its values
        2
    """

    exit_code = 2


class InputError(IclProbeError):
    """A context, query or file that cannot be used.

    Example:
        >>> try: icl_probe.analyze(model, tokenizer, context="hot -> cold\\n", query="")
        ... except icl_probe.InputError as e: print(e.exit_code)  # the message says the query is empty
        1
    """


class ModelError(IclProbeError):
    """A model that cannot be loaded or is not supported.

    Example:
        >>> try: icl_probe.load_model("no-such-model")
        ... except icl_probe.ModelError as e: print(e.exit_code)  # the message lists the names it takes
        1
    """


class PatchError(IclProbeError):
    """A patch file that is malformed, tampered with, or made for another model.

    Example:
        >>> try: icl_probe.replay_patch(other_model, tokenizer, "p.safetensors")
        ... except icl_probe.PatchError as e: print(e.exit_code)  # made for other weights: the fingerprint differs
        1
    """


class MathError(IclProbeError):
    """A degenerate case of the update math: a tiny ‖z0‖ or non-finite activations.

    Example:
        >>> try: result = icl_probe.analyze(model, tokenizer, context, query)
        ... except icl_probe.MathError as e: print(e.exit_code)  # e.g. a vanishing ‖z0‖: names the layer
        1
    """
