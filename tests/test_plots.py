"""The PNG figures of dynamics, analysis and transfer documents: size, not blank, written atomically, matplotlib
optional, and what each panel shows (read back from the Figure's axes)."""

import random
import sys

import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")
ImageStat = pytest.importorskip("PIL.ImageStat")

from icl_probe.errors import InputError, UsageError  # noqa: E402
from icl_probe.plots import plot_analysis, plot_dynamics  # noqa: E402

MODULES = ("mlp.gate_proj", "mlp.up_proj")


def module_paths(layer: int) -> list[str]:
    return [f"model.layers.{layer}.{m}" for m in MODULES]


def dynamics_doc(num_layers: int, examples: int = 6, extras: bool = True) -> dict:
    """A synthetic `icl-probe.dynamics/1` document with realistic magnitudes and the None entries of real ones."""
    rng = random.Random(num_layers)
    prefixes = [{"examples": 0, "context_tokens": 0, "kl_patched": None, "top1": " cold", "target_prob": 0.05}]
    prefixes[0]["layers"] = []
    for n in range(1, examples + 1):
        layers = []
        for layer in range(num_layers):
            modules = {
                path: {
                    "delta_w_norm": 0.5 * (1 + layer) * (1 - 0.5**n) * rng.uniform(0.8, 1.2),
                    "step_norm": None if n == 1 else 0.5 * (1 + layer) * 0.5**n * rng.uniform(0.8, 1.2),
                    "step_cosine": None if n == 1 else rng.uniform(0.3, 0.9),
                    "prop31_error": None if n == 1 else 1e-7 * rng.uniform(0.5, 2),
                }
                for path in module_paths(layer)
            }
            layers.append({"layer": layer, "learning_rate": 1.0, "modules": modules})
        prob = 0.05 + 0.9 * (1 - 0.6**n)
        prefixes.append(
            {"examples": n, "context_tokens": 8 * n, "kl_patched": 1e-11 * rng.uniform(0.5, 3), "top1": " hot"}
            | {"target_prob": prob, "layers": layers}
        )
    doc = {"schema": "icl-probe.dynamics/1", "model": "tiny/llama", "query": "cold ->", "prefixes": prefixes}
    doc |= {"target": {"token": " hot", "id": 42}, "gradient_alignment": None, "finetune": None, "ablation": None}
    if extras:
        doc["gradient_alignment"] = [
            {"layer": layer, "modules": {p: rng.uniform(-0.1, 0.6) for p in module_paths(layer)}}
            for layer in range(num_layers)
        ]
        steps = [
            {"step": s, "train_loss": 3 / s, "query_loss": 2.5 / s}
            | {"alignment": {str(layer): rng.uniform(0, 0.5) for layer in range(num_layers)}}
            for s in range(1, 6)
        ]
        doc["finetune"] = {"steps": steps, "implicit_query_loss": 0.3}
        doc["ablation"] = ablation(rng)
    return doc


def ablation(rng: random.Random) -> dict:
    return {
        "delta_w_only": {"kl": rng.uniform(0.5, 2), "top1_match": False},
        "bias_only": {"kl": rng.uniform(0.1, 1), "top1_match": True},
        "both": {"kl": 1e-11, "top1_match": True},
    }


def analysis_doc(num_layers: int, layer_ablation: bool = True) -> dict:
    """A synthetic `icl-probe.analysis/2` document; the last layer has a zero block error and a None alignment."""
    rng = random.Random(num_layers)
    layers = []
    for layer in range(num_layers):
        modules = {
            path: {"delta_w_norm": rng.uniform(0.5, 5), "weight_norm": 60.0, "rank": 1}
            | {"relative_norm": rng.uniform(0.005, 0.1), "gradient_alignment": rng.uniform(0, 0.5)}
            for path in module_paths(layer)
        }
        layers.append(
            {"layer": layer, "z0_norm": 20.0, "dz_norm": 5.0, "z_cosine": 0.9, "modules": modules}
            | {"attention_delta_norm": rng.uniform(1, 30), "mlp_branch_delta_norm": rng.uniform(1, 10)}
            | {"mlp_branch_error": 1e-7 * rng.uniform(0.5, 5), "residual_delta_norm": rng.uniform(0.5, 20)}
            | {"block_error": 1e-16 * rng.uniform(0, 5)}
        )
    layers[-1]["block_error"] = 0.0
    layers[-1]["modules"][module_paths(num_layers - 1)[0]]["gradient_alignment"] = None
    logits = {"kl_patched": 1e-11, "kl_no_context": 2.3, "top1_match": True, "max_logit_error": 1e-5}
    doc = {"schema": "icl-probe.analysis/2", "model": "tiny/llama", "model_type": "llama", "dtype": "float32"}
    doc |= {"residual": "bias", "query": "cold ->", "layers": layers, "logits": logits, "ablation": ablation(rng)}
    doc["layer_ablation"] = None
    if layer_ablation:
        doc["layer_ablation"] = [
            {"layer": layer, "without": {"kl": rng.uniform(1e-3, 1), "top1_match": True}}
            | {"alone": {"kl": rng.uniform(0.5, 2.3), "top1_match": False}}
            for layer in range(num_layers)
        ]
    return doc


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every Figure the plots save during the test, in order (the PNG is still written)."""
    from icl_probe import plots

    saved, save = [], plots.save

    def recording(fig, path):
        saved.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "save", recording)
    return saved


def check_png(path, size: tuple[int, int]) -> None:
    """A PNG of the given pixel size with plenty of ink and colour in it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 24)) > 200
    assert ImageStat.Stat(rgb.convert("L")).stddev[0] > 20


@pytest.mark.parametrize("num_layers", [2, 30])
@pytest.mark.parametrize("extras", [True, False])
def test_dynamics_png(tmp_path, figures, num_layers, extras):
    path = tmp_path / "dynamics.png"
    plot_dynamics(dynamics_doc(num_layers, extras=extras), path)
    check_png(path, (1200, 900))
    (ax,) = [ax for ax in figures[-1].axes if ax.get_title().startswith("(c)")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["target probability", "KL(context ‖ patched)"]
    assert [p.name for p in tmp_path.iterdir()] == ["dynamics.png"]


@pytest.mark.parametrize(
    ("num_layers", "layer_ablation", "gradient"), [(30, True, True), (2, False, False), (2, True, False)]
)
def test_analysis_png(tmp_path, figures, num_layers, layer_ablation, gradient):
    """Four panels, then a full-width row each for the gradient alignment and the per-layer ablation, if present."""
    doc = analysis_doc(num_layers, layer_ablation)
    if not gradient:
        for layer in doc["layers"]:
            for m in layer["modules"].values():
                m["gradient_alignment"] = None
    path = tmp_path / "analysis.png"
    plot_analysis(doc, path)
    check_png(path, (1200, 900 + 400 * (gradient + layer_ablation)))
    assert [p.name for p in tmp_path.iterdir()] == ["analysis.png"]
    titles = [ax.get_title() for ax in figures[-1].axes]
    assert len(titles) == 4 + gradient + layer_ablation
    assert any("gradient alignment" in t for t in titles) is gradient
    assert any("per-layer ablation" in t for t in titles) is layer_ablation
    texts = [t.get_text() for ax in figures[-1].axes for t in ax.texts]
    assert not any("not computed" in t for t in texts)  # an absent part gets no panel at all
    assert "Δb closes the gap at every block" in figures[-1].get_suptitle()  # no num_layers: not known partial


def test_gradient_panel_draws_each_alignment(figures, tmp_path):
    doc = analysis_doc(5, layer_ablation=False) | {"target": {"token": " hot", "id": 42}}
    plot_analysis(doc, tmp_path / "a.png")
    check_png(tmp_path / "a.png", (1200, 1300))
    (ax,) = [ax for ax in figures[-1].axes if "gradient alignment" in ax.get_title()]
    assert "' hot'" in ax.get_title()
    drawn = sorted(round(bar.get_height(), 12) for bar in ax.patches)
    wanted = sorted(round(m["gradient_alignment"], 12) for layer in doc["layers"] for m in layer["modules"].values()
                    if m["gradient_alignment"] is not None)  # fmt: skip
    assert drawn == wanted
    low, high = ax.get_ylim()
    assert low == -high and high > max(map(abs, wanted))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gate_proj", "up_proj"]


def test_partial_patch_caption(figures, tmp_path):
    doc = analysis_doc(3) | {"num_layers": 30}
    plot_analysis(doc, tmp_path / "a.png")
    title = figures[-1].get_suptitle()
    assert "only 3 of 30 layers patched" in title and "not expected to be 0" in title
    assert "Δb closes the gap at every block" not in title


def legend_box(ax):
    return ax.get_legend().get_window_extent()


def test_dynamics_target_panel_notes_zero_kl_and_keeps_its_legend_off_the_data(figures, tmp_path):
    doc = dynamics_doc(2)
    for p in doc["prefixes"][1:]:
        p["kl_patched"] = 0.0
    plot_dynamics(doc, tmp_path / "d.png")
    check_png(tmp_path / "d.png", (1200, 900))
    fig = figures[-1]
    fig.canvas.draw()
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith("(c)")]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["target probability", "KL(context ‖ patched)", "KL = 0 exactly, drawn at 1e-16"]
    assert legend_box(ax).y1 <= ax.get_window_extent().y0  # below the axes, so it covers no curve


def transfer_doc(sweep: bool = True) -> dict:
    """A synthetic `icl-probe.transfer/1` document: zero accuracies, and lines that coincide at 0 and at 1."""
    from icl_probe.transfer import METHODS, SCHEMA

    def accuracy(k: int) -> dict:
        values = {"zero_shot": 0.0, "icl": 1.0, "own_patch": 1.0, "single_patch": 0.0, "mean_patch": 0.25,
                  "joint_patch": 0.5 if k > 1 else 0.25, "thought_patch": 0.0, "task_vector": 0.75}  # fmt: skip
        return {m: values[m] for m in METHODS}

    ks = [1, 2, 4] if sweep else [4]
    entries = [{"calibration": k, "accuracy": accuracy(k)} for k in ks]
    return {"schema": SCHEMA, "model": "tiny/llama", "task": "antonyms", "calibration": ks[-1], "n_heldout": 8,
            "accuracy": entries[-1]["accuracy"], "sweep": entries}  # fmt: skip


@pytest.mark.parametrize("sweep", [True, False])
def test_transfer_bars_are_labelled_with_value_and_n_and_zeros_show(figures, tmp_path, sweep):
    from icl_probe.plots import plot_transfer

    doc = transfer_doc(sweep)
    plot_transfer(doc, tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as image:
        assert image.size == ((1400, 550) if sweep else (800, 550))
    bars = figures[-1].axes[0]
    labels = [t.get_text() for t in bars.texts]
    assert labels == [f"{v:.2f}\n{round(v * 8)}/8" for v in doc["accuracy"].values()]
    assert "0.00\n0/8" in labels and "n=8" in bars.get_title()
    assert bars.get_ylim()[0] < 0 < 1 < bars.get_ylim()[1]  # a zero bar's edge and the labels above 1 show
    assert all(bar.get_edgecolor()[3] > 0 and bar.get_linewidth() > 0 for bar in bars.patches)
    (stubs,) = [line for line in bars.get_lines() if line.get_marker() == "_"]  # a zero bar: a thick stub at 0
    zeros = [i for i, v in enumerate(doc["accuracy"].values()) if v == 0]
    assert list(stubs.get_xdata()) == zeros and set(stubs.get_ydata()) == {0} and stubs.get_markeredgewidth() >= 2


def test_transfer_sweep_lines_stay_visible_and_the_legend_is_outside(figures, tmp_path):
    from icl_probe.plots import plot_transfer

    plot_transfer(transfer_doc(), tmp_path / "t.png")
    fig = figures[-1]
    fig.canvas.draw()
    ax = fig.axes[1]
    low, high = ax.get_ylim()
    assert low < 0 and high > 1  # lines at 0 and 1 are not drawn on the axes' edges
    lines = ax.get_lines()
    assert len({(line.get_marker(), line.get_linestyle(), line.get_markersize()) for line in lines}) == len(lines)
    on_one = [line for line in lines if list(line.get_ydata()) == [1.0, 1.0, 1.0]]
    assert len(on_one) == 2 and on_one[0].get_markersize() != on_one[1].get_markersize()  # in context, own patch
    assert legend_box(ax).x0 >= ax.get_window_extent().x1  # right of the axes, over no line
    assert legend_box(ax).x1 <= fig.bbox.x1 + 1  # and inside the figure


def test_overwrite_is_atomic(tmp_path):
    """A second plot replaces the first through a temporary that does not outlive it."""
    path = tmp_path / "analysis.png"
    path.write_bytes(b"old")
    plot_analysis(analysis_doc(2), path)
    check_png(path, (1200, 1700))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.png"]


def test_failed_plot_leaves_nothing(tmp_path):
    doc = analysis_doc(2)
    del doc["ablation"]
    with pytest.raises(KeyError):
        plot_analysis(doc, tmp_path / "analysis.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"pip install 'icl-probe\[plot\]'"):
        plot_dynamics(dynamics_doc(2), tmp_path / "dynamics.png")
    with pytest.raises(UsageError, match="`plot` needs matplotlib"):
        plot_analysis(analysis_doc(2), tmp_path / "analysis.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("plot", [plot_dynamics, plot_analysis])
def test_wrong_schema_is_refused(tmp_path, plot):
    other = dynamics_doc(2) if plot is plot_analysis else analysis_doc(2)
    with pytest.raises(InputError, match="expected 'icl-probe"):
        plot(other, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []
