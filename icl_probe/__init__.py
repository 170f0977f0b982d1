"""icl-probe: the implicit weight updates of in-context learning, measured exactly.

import icl_probe
model, tokenizer = icl_probe.load_model("smollm2-135m")
result = icl_probe.analyze(model, tokenizer, context="hot -> cold\\n", query="big ->")

The names below load on first use (PEP 562), so that the command line's help starts without torch.
"""

import importlib

from .errors import IclProbeError, InputError, MathError, ModelError, PatchError, UsageError
from .version import __version__

__all__ = [
    "Analysis", "Dynamics", "Export", "Heads", "Replay", "Vectors",
    "IclProbeError", "InputError", "MathError", "ModelError", "PatchError", "UsageError",
    "analyze", "export_patch", "load_model", "load_patch", "replay_patch", "score_heads", "track_dynamics",
    "__version__",
]  # fmt: skip

# name -> the submodule that defines it, imported when the name is first asked for; no name is also a submodule's
# (tests/test_layout.py), so `icl_probe.dynamics` is always the module and `icl_probe.track_dynamics` the function
_LAZY = {
    "Analysis": "analysis", "analyze": "analysis", "Dynamics": "dynamics", "track_dynamics": "dynamics",
    "Export": "export", "export_patch": "export", "Heads": "heads", "score_heads": "heads", "Vectors": "inputs",
    "load_model": "models", "load_patch": "patchfile", "Replay": "replay", "replay_patch": "replay",
}  # fmt: skip


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
