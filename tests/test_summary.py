"""icl_probe.summary: the aggregates the terminal reports show, against values worked out by hand."""

import math

import pytest

from icl_probe import summary


def module(rel, rank=1, align=None):
    return {"relative_norm": rel, "rank": rank, "gradient_alignment": align, "delta_w_norm": 1.0, "weight_norm": 1.0}


LAYERS = [
    {"layer": 0, "modules": {"model.layers.0.mlp.gate_proj": module(0.5, align=0.2),
                             "model.layers.0.attn.gate_proj": module(0.25)}},
    {"layer": 1, "modules": {"model.layers.1.mlp.gate_proj": module(None)},
     "moe": {"params": {"model.layers.1.mlp.experts.w.weight": module(2.0, rank=3, align=0.6)}}, "mixer": "mamba"},
]  # fmt: skip


def test_rss_and_mean_skip_missing_values():
    assert summary.rss([3.0, None, 4.0]) == 5.0
    assert summary.mean([1.0, None, 2.0]) == 1.5
    assert summary.rss([None]) is None and summary.mean([]) is None


def test_per_layer_figures():
    doc = {"layers": LAYERS}
    # two modules named gate_proj: their paths inside the block tell them apart
    assert summary.module_names(LAYERS) == {"mlp.gate_proj": "mlp.gate_proj", "attn.gate_proj": "attn.gate_proj",
                                            "w": "mlp.experts.w"}  # fmt: skip
    assert [summary.max_relative(x) for x in LAYERS] == [0.5, 2.0]
    assert summary.top_relative(LAYERS) == 2.0
    assert summary.mean_alignment(LAYERS[0]) == 0.2 and summary.mean_alignment(LAYERS[1]) == 0.6
    assert summary.aligned_names(doc) == {"mlp.gate_proj": "mlp.gate_proj", "w": "mlp.experts.w"}
    assert summary.update_ranks(doc) == {1, 3}
    assert summary.mixer_layers(LAYERS) == {"attention": [0], "mamba": [1]}
    assert summary.module_value(LAYERS[1], "mlp.experts.w", "relative_norm") == 2.0
    assert summary.module_value(LAYERS[1], "attn.gate_proj", "relative_norm") is None


def test_layer_growth_over_prefixes():
    def rec(steps, lr=0.1):
        mods = {f"m{i}": {"step_norm": s, "delta_w_norm": 2.0 * s, "prop31_error": e, "step_cosine": c}
                for i, (s, e, c) in enumerate(steps)}  # fmt: skip
        return {"layer": 3, "modules": mods, "learning_rate": lr}

    growth = summary.layer_growth(
        [rec([(3.0, None, None), (4.0, None, None)]), rec([(1.0, 0.5, 0.2), (0.0, 0.1, 0.4)])]
    )
    assert growth["steps"] == [5.0, 1.0]
    assert growth["delta_w_norm"] == 2.0 and growth["prop31_error"] == 0.5 and growth["learning_rate"] == 0.1
    assert growth["step_cosine"] == pytest.approx(0.3, abs=1e-15)


def test_knockout_means_average_the_draws():
    rows = [
        {"k": 2, "ranking": r, "accuracy": a, "kl": kl, "delta_w_remaining": w}
        for r, a, kl, w in [("random", 0.5, 1.0, 0.8), ("random", 1.0, 3.0, None), ("delta_w", 0.0, 4.0, 0.1)]
    ]
    (k, cells), = summary.knockout_means({"rows": rows})  # fmt: skip
    assert k == 2
    assert cells == [0.0, 4.0, 0.1, None, None, None, 0.75, 2.0, 0.8]


def test_compression_of_an_empty_patch_is_nan():
    assert summary.compression({"dense_bytes": 800, "patch_bytes": 8}) == 100.0
    assert math.isnan(summary.compression({"dense_bytes": 0, "patch_bytes": 0}))
