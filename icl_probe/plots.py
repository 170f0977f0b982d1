"""PNG figures of the JSON that `dynamics`, `analyze` and `transfer` write; they pick values and compute nothing.

matplotlib is optional (`pip install 'icl-probe[plot]'`) and imported only when a figure is drawn. Figures are
built on a bare `Figure` with the Agg canvas, so pyplot's global state is never touched. Every series varies
line style, marker or hatch as well as colour, and colours come from viridis/cividis, so prints in grey still read.
"""

from __future__ import annotations

__all__ = [
    "plot_dynamics", "plot_analysis", "plot_transfer", "plot_study", "check_schema", "new_figure", "save", "label",
    "style", "setup"
]  # fmt: skip

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError, UsageError
from .fileio import atomic_write

DYNAMICS_SCHEMA = "icl-probe.dynamics/1"
ANALYSIS_SCHEMA = "icl-probe.analysis/2"
DPI = 100
DYNAMICS_SIZE = (12, 9)  # inches: 1200 × 900 pixels at DPI
MAX_LEGEND_LAYERS = 8  # more layers than this get a colorbar instead of a legend
FLOOR = 1e-16  # zeros (and smaller) are drawn here on log axes
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":"]
HATCHES = ["", "//", "..", "xx", "\\\\", "++"]
CAPTION = "Δb closes the gap at every block by construction; mlp_branch_error tests the theorem"
ABLATIONS = {"delta_w_only": "ΔW only", "bias_only": "Δb only", "both": "ΔW and Δb"}


def plot_dynamics(doc: dict, path: str | Path) -> None:
    """Write a 2×2 PNG (1200×900 px) of an `icl-probe.dynamics/1` document to `path`, atomically.

    Panels: step norm and ‖ΔW‖ per layer against the number of examples, the target's probability, alignments.
    """
    check_schema(doc, DYNAMICS_SCHEMA)
    fig = new_figure(DYNAMICS_SIZE)
    fig.get_layout_engine().set(wspace=0.12)  # room for panel (c)'s second y axis
    (a, b), (c, d) = fig.subplots(2, 2)
    target = doc["target"]["token"]
    fig.suptitle(f"icl-probe dynamics — {label(doc['model'])}\nquery {label(doc['query'])!r} → target {target!r}")
    steps = layer_series(doc["prefixes"], "step_norm")
    by_layer = plot_by_layer(a, steps, "‖step‖ (√Σ over modules)", "(a) step norm: change of ΔW per added example")
    norms = layer_series(doc["prefixes"], "delta_w_norm")
    by_layer = plot_by_layer(b, norms, "‖ΔW‖ (√Σ over modules)", "(b) implicit update ‖ΔW‖") or by_layer
    if by_layer is not None:
        bar = fig.colorbar(by_layer, ax=[a, b], label="layer", aspect=30)
        bar.ax.yaxis.set_major_locator(integer_ticks())
    plot_target(c, doc)
    plot_alignments(d, doc.get("gradient_alignment"), doc.get("finetune"))
    save(fig, path)


def plot_analysis(doc: dict, path: str | Path) -> None:
    """Write a PNG of an `icl-probe.analysis/2` document to `path`, atomically: 1200 px wide, 900 px high,
    plus 400 px for each of the gradient alignment (with `gradient`) and the per-layer ablation (with it).

    Panels: relative ‖ΔW‖, ‖Δb‖ and ‖ΔA‖, the per-block errors per layer; the ablation KLs; then, when the
    document has them, ∇cos per module and layer, and the per-layer ablation. Absent parts get no panel.
    """
    check_schema(doc, ANALYSIS_SCHEMA)
    layers = doc["layers"]
    extras = [plot_gradient] * has_gradient(layers) + [plot_layer_ablation] * (doc.get("layer_ablation") is not None)
    fig = new_figure(analysis_size(len(extras)))
    grid = fig.add_gridspec(2 + len(extras), 2)
    axes = [fig.add_subplot(grid[i, j]) for i in range(2) for j in range(2)]
    axes += [fig.add_subplot(grid[2 + i, :]) for i in range(len(extras))]
    fig.suptitle(
        f"icl-probe analyze — {label(doc['model'])} ({doc['model_type']}, {doc['dtype']}, residual={doc['residual']})"
        f"\n{caption(layers, doc.get('num_layers'))}"
    )
    plot_relative_norms(axes[0], layers)
    bars_by_layer(
        axes[1],
        layers,
        {"‖Δb‖": [x["residual_delta_norm"] for x in layers], "‖ΔA‖": [x["attention_delta_norm"] for x in layers]},
        "norm (log)",
        "(b) residual bias ‖Δb‖ and attention change ‖ΔA‖",
    )
    errors = {"mlp_branch_error": "mlp_branch_error", "block_error (≈0 by construction)": "block_error"}
    lines_by_layer(
        axes[2],
        [x["layer"] for x in layers],
        {name: [x[key] for x in layers] for name, key in errors.items()},
        "relative error (log; zeros at 1e-16)",
        "(c) errors per block",
    )
    plot_ablation(axes[3], doc["ablation"], doc["logits"]["kl_no_context"])
    for ax, letter, extra in zip(axes[4:], "ef", extras):
        extra(ax, doc, f"({letter})")
    save(fig, path)


def caption(layers: list[dict], num_layers: int | None) -> str:
    """What KL(context ‖ patched) proves: the plumbing when every layer is patched, nothing when only some are."""
    if num_layers is None or len(layers) >= num_layers:
        return CAPTION
    return (f"only {len(layers)} of {num_layers} layers patched: the others run on the query alone, so KL(context ‖ "
            "patched) is not expected to be 0")  # fmt: skip


def analysis_size(extra_rows: int) -> tuple[float, float]:
    """Inches: 12 wide; 9 high for the four main panels, and 4 more per full-width panel below them."""
    return (12, 9 + 4 * extra_rows)


def has_gradient(layers: list[dict]) -> bool:
    return any(m.get("gradient_alignment") is not None for x in layers for m in x["modules"].values())


def plot_transfer(doc: dict, path: str | Path) -> None:
    """Accuracy per method as labelled bars (the largest K), and with a sweep, accuracy against K."""
    from .transfer import METHODS, SCHEMA

    check_schema(doc, SCHEMA)
    sweep = doc["sweep"]
    fig = new_figure((14, 5.5) if len(sweep) > 1 else (8, 5.5))
    axes = fig.subplots(1, 2 if len(sweep) > 1 else 1, squeeze=False, width_ratios=[1, 1.3][: 1 + (len(sweep) > 1)])[0]
    methods = [m for m in METHODS if doc["accuracy"][m] is not None]
    accuracy_bars(axes[0], doc, methods)
    if len(sweep) > 1:
        accuracy_sweep(axes[1], doc, methods)
    save(fig, path)


def accuracy_bars(ax, doc: dict, methods: list[str]) -> None:
    """A bar per method, each labelled with its accuracy and count of n; a bar of 0 shows as a line and its label."""
    from .transfer import LABELS

    n = doc["n_heldout"]
    values = [doc["accuracy"][m] for m in methods]
    bars = ax.bar(range(len(methods)), values, color="#3b528b", edgecolor="black", linewidth=0.8)
    ax.bar_label(bars, [f"{v:.2f}\n{round(v * n)}/{n}" for v in values], padding=2, fontsize=8)
    zeros = [i for i, v in enumerate(values) if v == 0]
    ax.plot(zeros, [0] * len(zeros), linestyle="none", marker="_", markersize=24, markeredgewidth=3, color="#3b528b",
            zorder=3, clip_on=False)  # a bar of height 0, drawn as a thick stub on the axis  # fmt: skip
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.18)  # room above 1 for the labels; a zero bar's edge stays off the axis line
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_ylabel("first-token accuracy, held-out queries")
    ax.set_title(f"{doc['model']} · {doc['task']} · K={doc['calibration']} · n={n} held-out queries", fontsize=10)


def accuracy_sweep(ax, doc: dict, methods: list[str]) -> None:
    """Accuracy against K, one line per method; equal lines stay visible through their styles and hollow markers
    of decreasing size, the axis is padded past 0 and 1, and the legend sits outside the axes."""
    from .transfer import LABELS

    sweep = doc["sweep"]
    ks = [e["calibration"] for e in sweep]
    for i, m in enumerate(methods):
        s = style(i, len(methods))
        ax.plot(ks, [e["accuracy"][m] for e in sweep], label=LABELS[m], color=s["color"], marker=s["marker"],
                linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=12 - i, markerfacecolor="none",
                markeredgewidth=1.5, linewidth=1.5)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(-0.06, 1.06)
    ax.set_xlabel("calibration queries K")
    ax.set_ylabel("first-token accuracy")
    ax.set_title(f"accuracy against K (n={doc['n_heldout']} held-out queries)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))


def plot_study(summary: dict, path: str | Path) -> None:
    """Zero-shot and in-context accuracy per (model, task) of an `icl-probe.study/1` summary, with Wilson bars."""
    check_schema(summary, "icl-probe.study/1")
    groups = [g for g in summary["groups"] if g["icl"]]
    fig = new_figure((max(6.0, 0.9 * len(groups)), 5))
    ax = fig.subplots()
    for shift, method, color in ((-0.2, "zero_shot", "#9ecae1"), (0.2, "icl", "#3b528b")):
        cells = [g["icl"][method] for g in groups]
        p = [c["p"] for c in cells]
        errors = [[max(0.0, c["p"] - c["low"]) for c in cells], [max(0.0, c["high"] - c["p"]) for c in cells]]
        xs = [i + shift for i in range(len(groups))]
        ax.bar(xs, p, width=0.4, yerr=errors, capsize=3, color=color, label=method.replace("_", "-"))
    ax.set_xticks(range(len(groups)), [label(f"{g['model']} · {g['task']}", 40) for g in groups], rotation=40,
                  ha="right", fontsize=8)  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("first-token accuracy, held-out queries (95% Wilson)")
    ax.legend(fontsize=8)
    save(fig, path)


def check_schema(doc: dict, schema: str) -> None:
    found = doc.get("schema") if isinstance(doc, dict) else None
    if found != schema:
        raise InputError(f"cannot plot a document of schema {found!r}: expected {schema!r}; pass that command's JSON")


def new_figure(size: tuple[float, float]):
    """A bare Figure on the Agg canvas; UsageError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UsageError("`plot` needs matplotlib: pip install 'icl-probe[plot]'") from e
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> None:
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing")  # exotic tokens in titles
            fig.savefig(tmp, format="png", dpi=DPI)

    atomic_write(path, write)


def label(text: str, limit: int = 60) -> str:
    """One line of at most `limit` characters, with `$` escaped so that matplotlib does not read it as math."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def combined(modules: dict, key: str) -> float | None:
    """√(Σ value²) of one key over a layer's modules, None when no module has a value."""
    values = [m[key] for m in modules.values() if m.get(key) is not None]
    return math.sqrt(sum(v * v for v in values)) if values else None


def layer_series(prefixes: list[dict], key: str) -> dict[int, tuple[list, list]]:
    """{layer: (examples, combined values)} over the prefixes where that layer has a value."""
    series: dict[int, tuple[list, list]] = {}
    for prefix in prefixes:
        for entry in prefix["layers"]:
            value = combined(entry["modules"], key)
            if value is not None:
                xs, ys = series.setdefault(entry["layer"], ([], []))
                xs.append(prefix["examples"])
                ys.append(value)
    return series


def style(i: int, n: int, cmap: str = "viridis") -> dict:
    """Colour, marker and line style of series i of n; the colour stops short of the palest end of the map."""
    import matplotlib

    colour = matplotlib.colormaps[cmap](0.85 * i / max(n - 1, 1))
    return {"color": colour, "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def plot_by_layer(ax, series: dict[int, tuple[list, list]], ylabel: str, title: str):
    """One line per layer with a legend; for many layers no legend, and the colour map to draw as a colorbar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    setup(ax, "in-context examples", ylabel, title)
    if not series:
        return empty(ax, "no layer has a value")
    mappable = None
    layers = sorted(series)
    styles = [style(i, len(layers)) for i in range(len(layers))]
    if len(layers) <= MAX_LEGEND_LAYERS:
        for layer, s in zip(layers, styles):
            ax.plot(*series[layer], label=f"layer {layer}", markersize=4, **s)
        ax.legend(fontsize=8, ncols=2)
    else:
        for layer, s in zip(layers, styles):
            ax.plot(*series[layer], color=s["color"], linewidth=1, marker=".", markersize=3)
        cmap = ListedColormap([s["color"] for s in styles])
        norm = BoundaryNorm([x - 0.5 for x in layers] + [layers[-1] + 0.5], len(layers))
        mappable = ScalarMappable(norm=norm, cmap=cmap)
    log_if_positive(ax, (y for _, ys in series.values() for y in ys))
    return mappable


def plot_target(ax, doc: dict) -> None:
    """The target's probability against the examples, and KL(context ‖ patched) on a second, log axis.

    A KL of exactly 0 cannot sit on a log axis: it is drawn at FLOOR with a hollow marker, and the legend says so.
    The legend sits below the axes, clear of both curves.
    """
    prefixes = doc["prefixes"]
    xs = [p["examples"] for p in prefixes]
    title = f"(c) probability of the target {label(doc['target']['token'], 20)!r} after the update"
    setup(ax, "in-context examples", "p(target | query alone, ΔW, Δb)", title)
    handles = ax.plot(xs, [p["target_prob"] for p in prefixes], label="target probability", **style(0, 2, "cividis"))
    ax.set_ylim(0, 1.05)
    kl = [(p["examples"], p["kl_patched"]) for p in prefixes if p.get("kl_patched") is not None]
    if kl:
        twin = ax.twinx()
        line = style(1, 2, "cividis")
        handles += twin.plot([x for x, _ in kl], [max(y, FLOOR) for _, y in kl], label="KL(context ‖ patched)", **line)
        zeros = [x for x, y in kl if y <= 0]
        if zeros:
            marker = {"color": line["color"], "marker": "o", "markerfacecolor": "white", "linestyle": "none"}
            handles += twin.plot(zeros, [FLOOR] * len(zeros), markersize=8, label="KL = 0 exactly, drawn at 1e-16",
                                 **marker)  # fmt: skip
        twin.set_yscale("log")
        twin.set_ylabel("KL (nats, log)")
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=len(handles))


def plot_alignments(ax, gradient: list[dict] | None, finetune: dict | None) -> None:
    """Per-layer cosine alignments of ΔW with the gradient and with fine-tuning's update at its last step."""
    setup(ax, "layer", "cosine alignment", "(d) alignment of ΔW with gradient descent")
    if gradient is None and finetune is None:
        return empty(ax, "not computed (use gradient / finetune_steps)")
    series = {}
    if gradient is not None:
        means = [(g["layer"], mean(g["modules"].values())) for g in gradient]
        series["gradient (mean over modules)"] = [(x, y) for x, y in means if y is not None]
    if finetune is not None and finetune["steps"]:
        last = finetune["steps"][-1]
        points = sorted((int(k), v) for k, v in last["alignment"].items() if v is not None)
        series[f"fine-tuning, step {last['step']}"] = points
    for i, (name, points) in enumerate(series.items()):
        if points:
            ax.plot(*zip(*points), label=name, markersize=4, **style(i, 2, "cividis"))
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.legend(fontsize=8)


def plot_relative_norms(ax, layers: list[dict]) -> None:
    """Bars of ‖ΔW‖/‖W‖ per layer, one hatched bar group per module name."""
    names = list(dict.fromkeys(path.rsplit(".", 1)[-1] for x in layers for path in x["modules"]))
    values = {name: [] for name in names}
    for x in layers:
        by_name = {path.rsplit(".", 1)[-1]: m.get("relative_norm") for path, m in x["modules"].items()}
        for name in names:
            values[name].append(by_name.get(name))
    title = "(a) relative update ‖ΔW‖ / ‖W‖ per module"
    bars_by_layer(ax, layers, values, "‖ΔW‖ / ‖W‖ (log)", title)


def bars_by_layer(ax, layers: list[dict], series: dict[str, list], ylabel: str, title: str) -> None:
    """Grouped bars per layer on a log axis; None values are left out."""
    setup(ax, "layer", ylabel, title)
    xs = [x["layer"] for x in layers]
    width = 0.8 / max(len(series), 1)
    for i, (name, ys) in enumerate(series.items()):
        points = [(x + (i - (len(series) - 1) / 2) * width, max(y, FLOOR)) for x, y in zip(xs, ys) if y is not None]
        colour = style(i, len(series), "cividis")["color"]
        kwargs = {"color": colour, "hatch": HATCHES[i % len(HATCHES)], "edgecolor": "black", "linewidth": 0.3}
        if points:
            ax.bar(*zip(*points), width=width, label=name, **kwargs)
    values = [max(y, FLOOR) for ys in series.values() for y in ys if y is not None]
    if not values:
        return empty(ax, "no values")
    ax.set_yscale("log")
    ax.set_ylim(min(values) / 3, max(values) * 6)  # the smallest bar stays visible; the legend gets headroom
    ax.legend(fontsize=8, ncols=len(series), loc="upper left")


def lines_by_layer(ax, xs: list[int], series: dict[str, list], ylabel: str, title: str) -> None:
    """One line per series against the layer, on a log axis with zeros drawn at FLOOR."""
    setup(ax, "layer", ylabel, title)
    for i, (name, ys) in enumerate(series.items()):
        points = [(x, max(y, FLOOR)) for x, y in zip(xs, ys) if y is not None]
        if points:
            ax.plot(*zip(*points), label=name, markersize=4, **style(i, len(series), "cividis"))
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def plot_ablation(ax, ablation: dict, kl_no_context: float) -> None:
    """The KL to the with-context output of each ablation, on a log axis, with the no-context KL for reference."""
    xlabel = "update applied to the query alone, as weights\n(which rounds differently from the sequential run)"
    setup(ax, xlabel, "KL(context ‖ patched), nats (log)", "(d) ablation")
    names = [k for k in ABLATIONS if k in ablation]
    kls = [max(ablation[k]["kl"], FLOOR) for k in names]
    for i, kl in enumerate(kls):
        colour = style(i, len(names), "cividis")["color"]
        ax.bar(i, kl, color=colour, hatch=HATCHES[i % len(HATCHES)], edgecolor="black", linewidth=0.3)
    kept = {True: "kept", False: "lost"}
    ticks = [f"{ABLATIONS[k]}\nKL {ablation[k]['kl']:.2g}, top-1 {kept[ablation[k]['top1_match']]}" for k in names]
    ax.set_xticks(range(len(names)), ticks)
    ax.axhline(max(kl_no_context, FLOOR), color="black", linestyle="--", linewidth=1, label="no context (no update)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(kls + [kl_no_context]) / 10, top=max(kls + [kl_no_context]) * 100)
    ax.legend(fontsize=8, loc="upper right")


def plot_layer_ablation(ax, doc: dict, letter: str) -> None:
    """Per-layer KL with that layer's update removed and with it alone, on a log axis."""
    rows, kl_no_context = doc["layer_ablation"], doc["logits"]["kl_no_context"]
    title = f"{letter} per-layer ablation: the update without one layer, and that layer's update alone"
    ylabel = "KL(context ‖ patched), nats (log)"
    names = {"without": "all layers but this one", "alone": "this layer alone"}
    series = {name: [r[k]["kl"] for r in rows] for k, name in names.items()}
    lines_by_layer(ax, [r["layer"] for r in rows], series, ylabel, title)
    ax.axhline(max(kl_no_context, FLOOR), color="black", linestyle=":", linewidth=1, label="no context (no update)")
    ax.legend(fontsize=8)


def plot_gradient(ax, doc: dict, letter: str) -> None:
    """∇cos = cos_F(ΔW, −∇W L) per layer, one hatched bar per first linear, on a linear axis around 0."""
    layers = doc["layers"]
    names = list(dict.fromkeys(path.rsplit(".", 1)[-1] for x in layers for path in x["modules"]))
    target = (doc.get("target") or {}).get("token")
    of = f" of the target {label(repr(target), 24)}" if target is not None else ""
    setup(
        ax, "layer", "∇cos (1: ΔW points down the loss)", f"{letter} gradient alignment ∇cos = cos_F(ΔW, −∇W loss{of})"
    )
    width = 0.8 / max(len(names), 1)
    values = []
    for i, name in enumerate(names):
        points = [(x["layer"] + (i - (len(names) - 1) / 2) * width, m["gradient_alignment"])
                  for x in layers for path, m in x["modules"].items()
                  if path.rsplit(".", 1)[-1] == name and m.get("gradient_alignment") is not None]  # fmt: skip
        if points:
            colour = style(i, len(names), "cividis")["color"]
            ax.bar(*zip(*points), width=width, label=name, color=colour, hatch=HATCHES[i % len(HATCHES)],
                   edgecolor="black", linewidth=0.3)  # fmt: skip
            values += [y for _, y in points]
    ax.axhline(0, color="grey", linewidth=0.6)
    top = max(map(abs, values), default=1.0) * 1.3 or 1.0
    ax.set_ylim(-top, top)  # symmetric: the sign reads at a glance
    ax.legend(fontsize=8, ncols=len(names), loc="upper left")


def setup(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(integer_ticks())
    ax.grid(True, which="major", alpha=0.3)


def integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="dimgrey")
    ax.set_xticks([])
    ax.set_yticks([])


def log_if_positive(ax, values: Iterable[float]) -> None:
    if all(v > 0 for v in values):
        ax.set_yscale("log")


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
