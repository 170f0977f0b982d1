"""`export_patch`: analyze a prompt, then write its update as a native patch, a LoRA adapter or a merged model.

native: one float32 .safetensors file (patchfile.py). peft: a LoRA folder (r=1, lora_alpha=1) that
peft and transformers' `load_adapter` load. merged: a save_pretrained folder whose weights include
the update. Every output is written under a temporary name and renamed into place; afterwards the
update is read back from what was written and scored again (`kl_stored`).
"""

from __future__ import annotations

__all__ = [
    "FORMATS", "Export", "export_patch", "sizes", "check_linear_only", "write_adapter", "base_reference",
    "adapter_tensors", "read_adapter"
]  # fmt: skip

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import arch, decoder
from .analysis import Analysis, analyze
from .capture import last_logits, position_logits
from .errors import PatchError, UsageError
from .fileio import atomic_write_dir, check_writable
from .fingerprint import fingerprint
from .inputs import DEMO_CONTEXT, DEMO_QUERY
from .lowrank import MATH_DTYPE, LowRank, kl_divergence
from .models import no_progress_bars
from .patchfile import FORMAT, load_patch, model_family, save_patch
from .patching import Apply, Patch, applied, dense_added, replaced
from .version import __version__

FORMATS = ("native", "peft", "merged")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft names an adapter's tensors in adapter_model.safetensors
PROVENANCE = "icl-probe.json"  # the patch metadata, beside a peft or merged folder's own files
FLOAT32_BYTES = 4


@dataclass
class Export:
    """What `export_patch` wrote and measured; sizes are bytes, KLs are KL(context ‖ patched) in nats.

    `.to_dict()` is the `icl-probe.export/1` JSON document (docs/schemas.md), without the analysis.

    Example:
        >>> done = icl_probe.export_patch(model, tokenizer, output="p.safetensors")  # the antonym demo
        >>> done.file_bytes, done.dense_bytes  # the rank-1 file against dense ΔW matrices
        >>> done.kl_stored  # the update read back from the file
    """

    output: str
    format: str
    model: str
    layers: list[int]
    residual: str
    modules: int
    patch_bytes: int  # the update's tensors at float32
    dense_bytes: int  # the same updates as dense float32 matrices
    file_bytes: int  # what was written to disk
    kl_patched: float  # in memory, float64 factors
    kl_stored: float  # re-measured with the update read back from what was written
    kl_no_context: float
    top1_match: bool
    analysis: Analysis
    solved_at: str = "last"
    kl_stored_positions: list[float] | None = None  # solved at all positions: as written, at every query position

    def to_dict(self) -> dict:
        doc = {k: v for k, v in self.__dict__.items() if k != "analysis"}
        return {"schema": "icl-probe.export/1", **doc}


def export_patch(
    model: nn.Module,
    tokenizer,
    context: str | None = None,
    query: str | None = None,
    output: str | Path | None = None,
    format: str = "native",
    residual: str | None = None,
    layers: str | list[int] | None = None,
    store_context: bool = False,
    force: bool = False,
    positions: str = "last",
    analysis: Analysis | None = None,
) -> Export:
    """Analyze `context` + `query` and write the update to `output`, as a patch, an adapter or a checkpoint.

    Args:
        model, tokenizer: a causal LM and its tokenizer, as `load_model` returns them; the model is left unchanged.
        context, query: the prompt's two parts; with neither, the built-in antonym demo.
        output: the file (native) or folder (peft, merged) to write; an existing one is refused unless `force`.
        format: "native" (a safetensors patch), "peft" (a LoRA adapter, r = 1) or "merged" (a checkpoint).
        residual: "bias" or "fold" (default: bias for native; fold for peft and merged, and with `positions="all"`).
        layers: the blocks to patch: a spec such as "all", "3,7", "-4:", or a list of indices (default: all).
        store_context, force: keep the context's text in the patch; overwrite an existing output.
        positions: "last", or "all" to solve the update at every query position.
        analysis: that prompt's analysis, already run with these options (a batch's row), used instead of another.

    Returns:
        An `Export`: what was written, its size, and the KL of the written update reloaded.

    Example:
        >>> done = icl_probe.export_patch(model, tokenizer, "hot -> cold\\n", "big ->", output="p.safetensors")
        >>> done.kl_stored  # KL(context ‖ patched) with the update read back from the file: ≈ 0
        >>> patch = icl_probe.load_patch("p.safetensors")
    """
    residual = resolve_residual(format, residual, positions)
    if output is None:
        raise UsageError("give an output path with `output`")
    output = check_writable(output, force, directory=format != "native")
    check_foldable(model, format, positions)
    if context is None and query is None:
        context, query = DEMO_CONTEXT, DEMO_QUERY
    result = analysis or analyze(model, tokenizer, context, query, layers=layers, residual=residual,
                                 positions=positions)  # fmt: skip
    patch = result.patch
    patch.metadata = patch_metadata(model, result, context, query, store_context)
    file_bytes, apply = WRITERS[format](model, tokenizer, patch, output, force)
    with torch.no_grad(), apply():  # the with-context logits are analyze's: only the patched run is new
        stored = last_logits(model, result.prompt.query_only)
    stored_positions = positions_stored(model, result, apply) if result.solved_at == "all" else None
    return export_record(output, format, result, file_bytes, stored, stored_positions)


def export_record(
    output: Path,
    format: str,
    result: Analysis,
    file_bytes: int,
    stored: torch.Tensor,
    stored_positions: list[float] | None,
) -> Export:
    """What was written and measured; `stored` are the patched query's last logits with the update read back."""
    patch_bytes, dense_bytes = sizes(result.patch)
    return Export(
        output=str(output),
        format=format,
        model=result.model,
        layers=[r.layer for r in result.layers],
        residual=result.residual,
        modules=len(result.patch.low_rank) + len(result.patch.params),
        patch_bytes=patch_bytes,
        dense_bytes=dense_bytes,
        file_bytes=file_bytes,
        kl_patched=result.logits["kl_patched"],
        kl_stored=kl_divergence(result.context_logits, stored),
        kl_no_context=result.logits["kl_no_context"],
        top1_match=bool(result.context_logits.argmax() == stored.argmax()),
        analysis=result,
        solved_at=result.solved_at,
        kl_stored_positions=stored_positions,
    )


def positions_stored(model: nn.Module, result: Analysis, apply: Apply) -> list[float]:
    """KL(context ‖ patched as written) at every query position."""
    prompt, k = result.prompt, len(result.prompt.query)
    with torch.no_grad():
        ctx = position_logits(model, prompt.full, k)
        with apply():
            stored = position_logits(model, prompt.query_only, k)
    return [kl_divergence(c, s) for c, s in zip(ctx, stored)]


def resolve_residual(format: str, residual: str | None, positions: str = "last") -> str | None:
    """The residual mode for `format`; None leaves it to analyze (fold with positions="all")."""
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; use native, peft or merged")
    if residual is None:
        return None if positions == "all" else "bias" if format == "native" else "fold"
    if format != "native" and residual != "fold":
        raise UsageError(
            f'`format="{format}"` needs `residual="fold"`: weights alone cannot add a bias to a block\'s output; '
            f'drop `residual="{residual}"`'
        )
    return residual


def check_foldable(model: nn.Module, format: str, positions: str = "last") -> None:
    """peft needs Δb folded into a linear layer, merged needs it folded somewhere: refuse before any work."""
    family = model_family(model)
    if format == "peft" and positions == "all":
        raise PatchError(
            '`format="peft"` writes rank-1 adapters, and `positions="all"` gives an update of rank k (one per query '
            'position); use `format="native"` or `format="merged"`'
        )
    if format in ("peft", "merged") and any(b.moe for b in decoder.blocks(model)):
        raise PatchError(
            f'`format="{format}"` needs the residual term Δb folded into the weights, and {family.name}\'s '
            "mixture-of-experts MLPs add a routed sum of experts, so Δb folds into no one weight (peft's "
            'target_parameters could hold each expert\'s rank-1 ΔW, not Δb); use `format="native"`'
        )
    if format == "peft" and family.fold != "linear":
        raise PatchError(
            f'`format="peft"` cannot carry the residual term of {family.name}: a LoRA adapter only changes linear '
            f'layers, and {family.fold_note}; use `format="merged"` or `format="native"`'
        )
    if format == "merged" and family.fold is None:
        raise PatchError(
            f'`format="merged"` needs the residual term folded into the weights, and `residual="fold"` is not '
            f'available for {family.name}: {family.fold_note}; use `format="native"`'
        )


def patch_metadata(model: nn.Module, result: Analysis, context: str, query: str, store_context: bool) -> dict:
    """The native format's string metadata; no timestamps, so the same inputs give the same file."""
    meta = {
        "format": FORMAT,
        "model": result.model,
        "model_type": result.model_type,
        "model_fingerprint": fingerprint(model),
        "layers": json.dumps([r.layer for r in result.layers]),
        "residual": result.residual,
        "positions": "last",  # what readers of formats 1 and 2 require; where the update was solved is solved_at
        "solved_at": result.solved_at,
        "dtype": result.dtype,
        "query": query,
        "query_token_ids": json.dumps(result.prompt.query),
        "prefix_token_ids": json.dumps(result.prompt.prefix),
        "context_sha256": hashlib.sha256(context.encode("utf-8")).hexdigest(),
        "icl_probe_version": __version__,
    }
    if store_context:
        meta["context"] = context
    return meta


def sizes(patch: Patch) -> tuple[int, int]:
    """(bytes of the update as stored, bytes of the same updates as dense ΔW), both at float32."""
    extra = sum(b.numel() for b in patch.residual.values()) + sum(d.numel() for d in patch.dense.values())
    factors = sum(d.u.numel() + d.v.numel() for d in [*patch.low_rank.values(), *patch.params.values()])
    dense = sum(d.shape[0] * d.shape[1] for d in patch.low_rank.values())
    dense += sum(math.prod(d.shape) for d in patch.params.values())
    return FLOAT32_BYTES * (factors + extra), FLOAT32_BYTES * (dense + extra)


# ---- native ----------------------------------------------------------------------------------


def write_native(model: nn.Module, tokenizer, patch: Patch, output: Path, force: bool) -> tuple[int, Apply]:
    size = save_patch(patch, output, force)
    stored = load_patch(output)
    return size, lambda: applied(model, stored)


# ---- peft ------------------------------------------------------------------------------------


def write_peft(model: nn.Module, tokenizer, patch: Patch, output: Path, force: bool) -> tuple[int, Apply]:
    check_linear_only(patch)
    conv1d = model_family(model).conv1d
    atomic_write_dir(output, lambda tmp: write_adapter(patch, tmp, conv1d, base_reference(model)))
    stored = read_adapter(output, patch.metadata)
    return folder_size(output), lambda: applied(model, stored)


def check_linear_only(patch: Patch) -> None:
    """A LoRA adapter changes linear weights only: no residual bias, no dense (e.g. norm-scale) delta."""
    for path in sorted(patch.dense):
        raise PatchError(
            f'`format="peft"` cannot express the update to {path}: a LoRA adapter only changes linear layers, and '
            'this residual fold is a dense change to a norm\'s scale; use `format="merged"` or `format="native"`'
        )
    if patch.residual:
        raise PatchError('`format="peft"` cannot carry a residual bias; use `residual="fold"`')
    for path, delta in patch.low_rank.items():
        if delta.u.shape[1] != 1:
            raise PatchError(
                f'`format="peft"` writes rank-1 adapters, but the update to {path} has rank {delta.u.shape[1]}'
            )


def write_adapter(patch: Patch, folder: Path, conv1d: bool, base: str | None = None) -> None:
    """adapter_config.json (written by peft's LoraConfig) and adapter_model.safetensors, r=1 and scaling 1.

    `base` is the base model's folder or hub id for AutoPeftModel (None if there is none to give).
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=1,
        lora_alpha=1,  # scaling = lora_alpha / r = 1: B A is exactly ΔW
        target_modules=sorted(patch.low_rank),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=conv1d,  # Conv1D stores its weight as (in, out)
        task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=base,
    )
    config.save_pretrained(str(folder))
    sort_target_modules(folder / PEFT_CONFIG)
    save_file(adapter_tensors(patch), folder / PEFT_WEIGHTS, metadata={"format": "pt"})
    write_provenance(patch, folder)


def sort_target_modules(path: Path) -> None:
    """peft keeps target_modules as a set and writes it in hash order: sorted, the same patch gives the same file."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def base_reference(model: nn.Module) -> str | None:
    """Where the model was loaded from, as AutoPeftModel needs it: an absolute folder, a hub id, or None.

    Built-in names are not hub ids; their models load from the converted cache folder, which is given instead.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = str(getattr(model.config, "_name_or_path", "") or "")
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    try:
        validate_repo_id(name)  # owner/name, or an old single-word id such as gpt2
    except HFValidationError:
        return None
    return name


def adapter_tensors(patch: Patch) -> dict[str, torch.Tensor]:
    """lora_A (r, in) and lora_B (out, r) per module, with B A = u vᵀ and ‖A‖ = ‖B‖ for each rank."""
    tensors = {}
    for path, delta in sorted(patch.low_rank.items()):
        a, b = split_scale(delta)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.T.to(torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.to(torch.float32).contiguous()
    return tensors


def split_scale(delta: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """(v', u') with u' v'ᵀ = u vᵀ and each column of u' and v' of equal norm √(‖u‖‖v‖), in float64.

    The even split keeps both factors near the same magnitude, so rounding them to bf16 costs little.
    """
    u, v = delta.u.to(MATH_DTYPE), delta.v.to(MATH_DTYPE)
    nu, nv = u.norm(dim=0), v.norm(dim=0)  # (r,)
    nonzero = (nu > 0) & (nv > 0)
    scale_u = torch.where(nonzero, (nv / torch.where(nonzero, nu, 1)).sqrt(), 0)  # (r,)
    scale_v = torch.where(nonzero, (nu / torch.where(nonzero, nv, 1)).sqrt(), 0)
    return v * scale_v, u * scale_u


def read_adapter(folder: Path, metadata: dict[str, str]) -> Patch:
    """The adapter's tensors read back as a Patch: ΔW = lora_B @ lora_A."""
    tensors = load_file(folder / PEFT_WEIGHTS)
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    low_rank = {}
    for name, a in tensors.items():
        if name.endswith(suffix_a):
            path = name.removeprefix(PEFT_PREFIX).removesuffix(suffix_a)
            b = tensors[name.removesuffix(suffix_a) + suffix_b]
            low_rank[path] = LowRank(b.to(MATH_DTYPE), a.T.to(MATH_DTYPE))
    return Patch(low_rank=low_rank, metadata=dict(metadata))


# ---- merged ----------------------------------------------------------------------------------


def write_merged(model: nn.Module, tokenizer, patch: Patch, output: Path, force: bool) -> tuple[int, Apply]:
    deltas = merged_deltas(model, patch)

    def write(folder: Path) -> None:
        with torch.no_grad(), dense_added(model, deltas), no_progress_bars():
            model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_provenance(patch, folder)

    atomic_write_dir(output, write)
    stored = read_merged(output, set(deltas))
    return folder_size(output), lambda: replaced(model, stored)


def read_merged(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The touched weights as the merged checkpoint stores them, read back from its safetensors files."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({name: f.get_tensor(name) for name in names & set(f.keys())})
    missing = sorted(names - set(found))
    if missing:
        raise PatchError(f"the merged checkpoint written to {folder} lacks {missing[0]}; it cannot be scored")
    return found


def merged_deltas(model: nn.Module, patch: Patch) -> dict[str, torch.Tensor]:
    """Each touched parameter's dense delta in its stored layout and dtype (merging needs ΔW densely)."""
    if patch.residual:
        raise PatchError('`format="merged"` cannot carry a residual bias; use `residual="fold"`')
    family = model_family(model)
    deltas = {name: d.to(MATH_DTYPE) for name, d in patch.dense.items()}
    for path, delta in patch.low_rank.items():
        delta_w = delta.u.to(MATH_DTYPE) @ delta.v.to(MATH_DTYPE).T  # (out, in)
        name = f"{path}.weight"
        stored = arch.oriented(delta_w, family, model.get_parameter(name).shape)  # Conv1D stores (in, out)
        deltas[name] = deltas.get(name, 0) + stored
    return {name: d.to(model.get_parameter(name).dtype) for name, d in deltas.items()}


# ---- shared ----------------------------------------------------------------------------------


def write_provenance(patch: Patch, folder: Path) -> None:
    text = json.dumps(patch.metadata, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (folder / PROVENANCE).write_text(text, encoding="utf-8")


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


WRITERS = {"native": write_native, "peft": write_peft, "merged": write_merged}
