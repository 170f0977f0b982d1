"""icl-probe: the implicit weight updates of in-context learning, measured exactly.

import icl_probe
model, tokenizer = icl_probe.load_model("smollm2-135m")
result = icl_probe.analyze(model, tokenizer, context="hot -> cold\\n", query="big ->")

The names below load on first use (PEP 562), so that the command line's help starts without torch.
"""

import importlib
import sys
import types

from .errors import IclProbeError, InputError, MathError, ModelError, PatchError, UsageError

__version__ = "0.1.0"
__all__ = [
    "Analysis", "Dynamics", "Export", "IclProbeError", "InputError", "MathError", "ModelError", "PatchError",
    "Heads", "Replay", "UsageError", "Vectors", "analyze", "dynamics", "export_patch", "heads", "load_model",
    "load_patch", "replay",
    "__version__",
]  # fmt: skip

# name -> the submodule that defines it, imported when the name is first asked for
_LAZY = {
    "Analysis": "analysis", "analyze": "analysis", "Dynamics": "dynamics", "dynamics": "dynamics",
    "Export": "export", "export_patch": "export", "Heads": "heads", "heads": "heads", "Vectors": "inputs",
    "load_model": "models", "load_patch": "patchfile", "Replay": "replay", "replay": "replay",
}  # fmt: skip


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package, whose functions `heads` and `dynamics` shadow their submodules: importing a submodule must not
    replace the function (the import system sets the package attribute of each submodule it loads)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
