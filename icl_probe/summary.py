"""The aggregates the terminal reports show, computed from the JSON documents (plain dicts).

The renderers (icl_probe/cli/report/) only pick and format; every maximum, mean, grouping and ranking they
print comes from here: per-layer figures of `analyze`, the per-layer series of `dynamics`, the groups of
`modules`, the head rankings and knockout means of `heads`, the size ratio of `export-patch`.
"""

from __future__ import annotations

__all__ = [
    "MODULE_KEYS", "module_names", "module_value", "max_relative", "top_relative", "aligned_names",
    "mean_alignment", "has_fold_scale", "has_alignment", "update_ranks", "mixer_layers", "dependent_positions",
    "agreeing_tokens", "compression", "dynamics_layers", "layer_growth", "layer_alignments", "step_alignment",
    "module_groups", "shown_keys", "top_layer_heads", "top_heads", "knockout_means", "head_split_errors"
]  # fmt: skip

MODULE_KEYS = ("attention", "pre_mlp_norm", "mlp_first", "mlp_down", "post_mlp_norm")  # `modules`' columns


def rss(values) -> float | None:
    """Root-sum-square of the values that are not None; None if all are."""
    kept = [v for v in values if v is not None]
    return sum(v * v for v in kept) ** 0.5 if kept else None


def mean(values) -> float | None:
    """The mean of the values that are not None; None if all are."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# --- analyze: per layer -----------------------------------------------------------------------------------------


def layer_updates(layer: dict) -> dict[str, dict]:
    """The layer's updated weights, path → figures: its first linears, then any mixture-of-experts parameters."""
    params = (layer.get("moe") or {}).get("params", {})
    return {**layer["modules"], **{path.removesuffix(".weight"): m for path, m in params.items()}}


def module_names(layers: list[dict]) -> dict[str, str]:
    """Column name → module path inside the block, in order: 'gate_proj' → 'mlp.gate_proj' ('mlp.x' if names clash)."""
    inner: list[str] = []
    for layer in layers:
        for path in layer_updates(layer):
            rel = path.split(f".{layer['layer']}.", 1)[-1]  # 'model.layers.3.mlp.gate_proj' → 'mlp.gate_proj'
            if rel not in inner:
                inner.append(rel)
    last = [rel.rsplit(".", 1)[-1] for rel in inner]
    return {(name if last.count(name) == 1 else rel): rel for name, rel in zip(last, inner)}


def module_value(layer: dict, rel: str, key: str) -> float | None:
    """`key` of the module at `rel` inside this layer's block; None if the layer has no such module."""
    for path, module in layer_updates(layer).items():
        if path.split(f".{layer['layer']}.", 1)[-1] == rel:
            return module.get(key)
    return None


def max_relative(layer: dict) -> float | None:
    """The layer's largest ‖ΔW‖/‖W‖ over its updated weights."""
    values = [m["relative_norm"] for m in layer_updates(layer).values() if m["relative_norm"] is not None]
    return max(values, default=None)


def top_relative(layers: list[dict]) -> float:
    """The largest ‖ΔW‖/‖W‖ of any layer (0.0 if none has one): the full length of the report's bars."""
    return max((v for v in map(max_relative, layers) if v is not None), default=0.0)


def aligned_names(doc: dict) -> dict[str, str]:
    """The module_names whose ∇cos (gradient alignment) the document has for some layer."""
    names = module_names(doc["layers"])
    return {n: rel for n, rel in names.items() if any(module_value(x, rel, "gradient_alignment") is not None
                                                       for x in doc["layers"])}  # fmt: skip


def mean_alignment(layer: dict) -> float | None:
    """The layer's mean ∇cos over its updated weights."""
    return mean(m.get("gradient_alignment") for m in layer_updates(layer).values())


def has_fold_scale(doc: dict) -> bool:
    """Whether some layer reports the norm-scale fold's smallest |n_k|."""
    return any(layer.get("fold_min_abs_normalised") is not None for layer in doc["layers"])


def has_alignment(doc: dict) -> bool:
    """Whether some first linear of some layer has a gradient alignment."""
    return any(m.get("gradient_alignment") is not None for layer in doc["layers"] for m in layer["modules"].values())


def update_ranks(doc: dict) -> set[int]:
    """The ranks of every low-rank update in the document."""
    return {m["rank"] for layer in doc["layers"] for m in layer_updates(layer).values()}


def mixer_layers(layers: list[dict]) -> dict[str, list[int]]:
    """Mixer kind → its layers, in order of first appearance ('attention' where the layer names none)."""
    kinds: dict[str, list[int]] = {}
    for layer in layers:
        kinds.setdefault(layer.get("mixer") or "attention", []).append(layer["layer"])
    return kinds


def dependent_positions(doc: dict) -> list[tuple[int, dict]]:
    """(layer, {position, modules, block_error}) of every query position the rank-k fit could not match."""
    return [(layer["layer"], p) for layer in doc["layers"] for p in layer.get("dependent_positions") or []]


def agreeing_tokens(gen: dict) -> int:
    """How many teacher-forced tokens of a `generation` section have the patched top-1 equal to the context's."""
    return sum(t["id"] == t["patched_id"] for t in gen["tokens"])


def compression(doc: dict) -> float:
    """An `export-patch` document's dense ΔW bytes over its factors' bytes (NaN for an empty patch)."""
    return doc["dense_bytes"] / doc["patch_bytes"] if doc["patch_bytes"] else float("nan")


# --- dynamics ---------------------------------------------------------------------------------------------------


def dynamics_layers(doc: dict) -> dict[int, list[dict]]:
    """layer → its record at prefixes 1..n, in order."""
    by_layer: dict[int, list[dict]] = {}
    for p in doc["prefixes"]:
        for rec in p["layers"]:
            by_layer.setdefault(rec["layer"], []).append(rec)
    return by_layer


def layer_growth(recs: list[dict]) -> dict:
    """A layer's step norm per prefix (root-sum-square over modules), and at the last prefix its final ‖ΔW‖, the
    largest Prop. 3.1 error over modules, the learning rate and the mean step cosine."""
    last = recs[-1]["modules"].values()
    errors = [m["prop31_error"] for m in last if m["prop31_error"] is not None]
    return {
        "steps": [rss(m["step_norm"] for m in rec["modules"].values()) for rec in recs],
        "delta_w_norm": rss(m["delta_w_norm"] for m in last),
        "prop31_error": max(errors, default=None),
        "learning_rate": recs[-1]["learning_rate"],
        "step_cosine": mean(m["step_cosine"] for m in last),
    }


def layer_alignments(doc: dict) -> dict[int, float | None]:
    """layer → its mean ∇cos over modules, for a dynamics document with gradient alignments (else empty)."""
    return {row["layer"]: mean(row["modules"].values()) for row in doc.get("gradient_alignment") or []}


def step_alignment(step: dict) -> float | None:
    """A fine-tuning step's mean alignment over layers."""
    return mean(step["alignment"].values())


# --- modules ----------------------------------------------------------------------------------------------------


def relative(path: str | list[str] | None, block: str) -> str:
    """A module path (or several, one per line) relative to its block; '—' for none."""
    if path is None:
        return "—"
    paths = path if isinstance(path, list) else [path]
    return "\n".join(p.removeprefix(block + ".") for p in paths)


def module_groups(doc: dict) -> dict[tuple, list[int]]:
    """(block pattern, the paths relative to the block, one per MODULE_KEYS key) → the layers built alike."""
    groups: dict[tuple, list[int]] = {}
    for layer in doc["layers"]:
        rel = {k: relative(layer.get(k), layer["block"]) for k in MODULE_KEYS}
        if layer.get("moe"):  # the router and fused expert weights read the MLP input too
            first = [*layer["mlp_first"], *(p for p in layer["moe"]["params"] if p not in layer["mlp_first"])]
            rel["mlp_first"] = relative(first, layer["block"])
        if layer.get("mixer") not in (None, "attention"):
            rel["attention"] += f"\n({layer['mixer']})"
        block = layer["block"].removesuffix(f".{layer['layer']}") + ".N"
        groups.setdefault((block, *(rel[k] for k in MODULE_KEYS)), []).append(layer["layer"])
    return groups


def shown_keys(groups: dict[tuple, list[int]]) -> list[int]:
    """The indices into MODULE_KEYS worth a column: all but a post-MLP norm that no group has."""
    return [i for i, k in enumerate(MODULE_KEYS) if k != "post_mlp_norm" or any(g[1 + i] != "—" for g in groups)]


# --- heads ------------------------------------------------------------------------------------------------------


def top_layer_heads(layer: dict, n: int) -> list[dict]:
    """The layer's `n` heads with the largest share of its ΔW."""
    return sorted(layer["heads"], key=lambda h: -h["share_delta_w"])[:n]


def attention_entries(doc: dict) -> list[tuple[int, dict]]:
    """(layer, head) of every attention head (a mixer reported as one unit left out)."""
    return [(layer["layer"], h) for layer in doc["layers"] for h in layer["heads"] if isinstance(h["head"], int)]


def top_heads(doc: dict, n: int) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """The model's `n` heads with the largest share of its ΔW, and its `n` heads with the largest induction score."""
    entries = attention_entries(doc)
    by_w = sorted(entries, key=lambda e: -e[1]["share_delta_w_model"])[:n]
    by_ind = sorted(entries, key=lambda e: -(e[1]["induction_score"] or 0.0))[:n]
    return by_w, by_ind


def knockout_means(knockout: dict) -> list[tuple[int, list[float | None]]]:
    """Per k: the mean accuracy, KL and ΔW left of the delta_w, induction and random rankings (over their draws)."""
    rows = []
    for k in sorted({r["k"] for r in knockout["rows"]}):
        cells = []
        for ranking in ("delta_w", "induction", "random"):
            drawn = [r for r in knockout["rows"] if r["k"] == k and r["ranking"] == ranking]
            cells += [mean(r[key] for r in drawn) for key in ("accuracy", "kl", "delta_w_remaining")]
        rows.append((k, cells))
    return rows


def head_split_errors(doc: dict) -> tuple[float, float]:
    """The largest integrated-gradients completeness error and gap to the model's own Δz over the layers."""
    worst = max(layer["quadrature_error"] for layer in doc["layers"])
    gap = max(layer["delta_z_model_gap"] for layer in doc["layers"])
    return worst, gap
