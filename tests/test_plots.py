"""The PNG figures of dynamics and analysis documents: size, not blank, written atomically, and matplotlib optional."""

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
def test_dynamics_png(tmp_path, num_layers, extras):
    path = tmp_path / "dynamics.png"
    plot_dynamics(dynamics_doc(num_layers, extras=extras), path)
    check_png(path, (1200, 900))
    assert [p.name for p in tmp_path.iterdir()] == ["dynamics.png"]


@pytest.mark.parametrize("num_layers", [2, 30])
@pytest.mark.parametrize("layer_ablation", [True, False])
def test_analysis_png(tmp_path, num_layers, layer_ablation):
    path = tmp_path / "analysis.png"
    plot_analysis(analysis_doc(num_layers, layer_ablation), path)
    check_png(path, (1200, 1300))
    assert [p.name for p in tmp_path.iterdir()] == ["analysis.png"]


def test_overwrite_is_atomic(tmp_path):
    """A second plot replaces the first through a temporary that does not outlive it."""
    path = tmp_path / "analysis.png"
    path.write_bytes(b"old")
    plot_analysis(analysis_doc(2), path)
    check_png(path, (1200, 1300))
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
    with pytest.raises(UsageError, match="--plot needs matplotlib"):
        plot_analysis(analysis_doc(2), tmp_path / "analysis.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("plot", [plot_dynamics, plot_analysis])
def test_wrong_schema_is_refused(tmp_path, plot):
    other = dynamics_doc(2) if plot is plot_analysis else analysis_doc(2)
    with pytest.raises(InputError, match="expected 'icl-probe"):
        plot(other, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []
