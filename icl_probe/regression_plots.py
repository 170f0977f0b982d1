"""The regression PNG (`plot_regression`): the paper's Figures 2, 3 and 4, from an `icl-probe.regression/1` document.

Reads the document only; computes nothing but the bands (mean ± standard error).
"""

from __future__ import annotations

__all__ = ["plot_regression"]

from pathlib import Path

from .plots import check_schema, new_figure, save, setup, style

SCHEMA = "icl-probe.regression/1"


def plot_regression(doc: dict, path: str | Path) -> None:
    """Four panels: Figure 2 (losses over training), Figure 3 (step norms), Figure 4 (alignment, query losses)."""
    check_schema(doc, SCHEMA)
    fig = new_figure((11, 8))
    axes = fig.subplots(2, 2)
    plot_figure2(axes[0][0], doc["figure2"])
    plot_bands(axes[0][1], doc["figure3"]["i"], doc["figure3"], "step_norm_relative", doc["layers"])
    setup(axes[0][1], "pairs in context i", "‖ΔW_i − ΔW_{i−1}‖ / ‖W‖", "Figure 3: the update converges?")
    axes[0][1].set_yscale("log")
    plot_bands(axes[1][0], doc["figure4"]["i"], doc["figure4"], "alignment", doc["layers"])
    setup(axes[1][0], "pairs in context i", "cos_F(W_ft,i − W, ΔW_i)", "Figure 4: fine-tuning vs ΔW (online SGD)")
    plot_losses(axes[1][1], doc["figure4"])
    fig.suptitle(f"in-context regression: {doc['model']} ({doc['trials']} trials, mean ± SE)", fontsize=10)
    save(fig, path)


def plot_figure2(ax, f: dict) -> None:
    xs = f["checkpoints"]
    trained = [(x, y) for x, y in zip(xs, f["train_loss"]) if y is not None]
    if trained:
        ax.plot(*zip(*trained), label="training loss", color="grey")
    ax.plot(xs, f["val_loss_context"], label="validation, with context", marker="o")
    ax.plot(xs, f["val_loss_implicit"], label="validation, query alone with ΔW", marker="x", linestyle="--")
    worst = max(abs(v) for v in f["difference"])
    setup(ax, "training step", "squared error", f"Figure 2 (largest |difference| {worst:.1e})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def plot_bands(ax, xs: list[int], f: dict, key: str, layers: list[int]) -> None:
    means, ses = f[f"{key}_mean"], f[f"{key}_se"]
    for k, (layer, mean, se) in enumerate(zip(layers, means, ses)):
        st = style(k, len(layers))
        ax.plot(xs, mean, color=st["color"], label=f"layer {layer}", linewidth=1)
        low = [m - s if m == m and s == s else float("nan") for m, s in zip(mean, se)]
        high = [m + s if m == m and s == s else float("nan") for m, s in zip(mean, se)]
        ax.fill_between(xs, low, high, color=st["color"], alpha=0.25)
    if len(layers) > 1:
        ax.legend(fontsize=6, ncol=2)


def plot_losses(ax, f: dict) -> None:
    xs = f["i"]
    for name, text in (("context", "with context"), ("implicit", "implicit update"), ("finetune", "online SGD"),
                       ("full_batch", "full-batch step"), ("delta_w_only", "ΔW only")):  # fmt: skip
        mean, se = f[f"query_loss_{name}"], f[f"query_loss_{name}_se"]
        line = ax.plot(xs, mean, label=text, linewidth=1)[0]
        ax.fill_between(xs, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                        color=line.get_color(), alpha=0.2)  # fmt: skip
    setup(ax, "pairs in context i", "query squared error", f"query loss (SGD lr {f['lr']:g}, {f['lr_rule']})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
