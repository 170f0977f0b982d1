"""The heads figure (`plot_heads`): heatmaps (layer × head) of the share of ΔW, the induction score and the knockout
effect, side by side, each with labelled axes and a colour bar. Reads the `icl-probe.heads/1` document only."""

from __future__ import annotations

__all__ = ["plot_heads"]

import math
from pathlib import Path

from .plots import check_schema, label, new_figure, save

PANELS = (
    ("share_delta_w", "share of the layer's ΔW", "RdBu_r"),
    ("induction_score", "induction score", "viridis"),
    ("knockout_kl", "KL(in context ‖ head knocked out)", "magma"),
)


def grid(doc: dict, key: str) -> tuple[list[int], list[list[float]]]:
    """Layers with attention heads, and a row per layer of `key` per head (NaN where missing)."""
    layers = [layer for layer in doc["layers"] if any(isinstance(h["head"], int) for h in layer["heads"])]
    width = max(len(layer["heads"]) for layer in layers)
    rows = []
    for layer in layers:
        values = [h.get(key) for h in layer["heads"]]
        rows.append([math.nan if v is None else v for v in values] + [math.nan] * (width - len(values)))
    return [layer["layer"] for layer in layers], rows


def plot_heads(doc: dict, path: str | Path) -> None:
    """Three heatmaps side by side, layer on the y axis and head on the x axis."""
    from .heads import SCHEMA

    check_schema(doc, SCHEMA)
    fig = new_figure((15, 6))
    axes = fig.subplots(1, 3)
    for ax, (key, title, cmap) in zip(axes, PANELS):
        layers, rows = grid(doc, key)
        finite = [abs(v) for row in rows for v in row if not math.isnan(v)]
        if not finite:
            ax.text(0.5, 0.5, "not measured (run with knockout)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        top = max(finite) or 1.0
        limits = dict(vmin=-top, vmax=top) if key == "share_delta_w" else dict(vmin=0.0, vmax=top)
        image = ax.imshow(rows, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", **limits)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6 if len(layers) > 20 else 8)
        ax.set_xticks(range(len(rows[0])), [str(h) for h in range(len(rows[0]))], fontsize=8)
        ax.set_xlabel("head (query head)")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, label=title)
    task = f" · {doc['task']}" if doc.get("task") else ""
    fig.suptitle(label(f"{doc['model']}{task} · query {doc['query']!r}", 100), fontsize=11)
    save(fig, path)
