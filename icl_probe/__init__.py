"""icl-probe: the implicit weight updates of in-context learning, measured exactly.

import icl_probe
model, tokenizer = icl_probe.load_model("smollm2-135m")
result = icl_probe.analyze(model, tokenizer, context="hot -> cold\\n", query="big ->")
"""

from .analysis import Analysis, analyze
from .dynamics import Dynamics, dynamics  # the function shadows the submodule as an attribute; import it by path
from .errors import IclProbeError, InputError, MathError, ModelError, PatchError, UsageError
from .export import Export, export_patch
from .heads import Heads, heads  # the function shadows the submodule as an attribute; import it by path
from .inputs import Vectors
from .models import load_model
from .patchfile import load_patch
from .replay import Replay, replay

__version__ = "0.1.0"
__all__ = [
    "Analysis", "Dynamics", "Export", "IclProbeError", "InputError", "MathError", "ModelError", "PatchError",
    "Heads", "Replay", "UsageError", "Vectors", "analyze", "dynamics", "export_patch", "heads", "load_model",
    "load_patch", "replay",
    "__version__",
]  # fmt: skip
