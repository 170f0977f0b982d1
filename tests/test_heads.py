"""`icl-probe heads`: the split by head against dense computations written here, the scores against attention
weights read here, the knockout against a forward written here, bad input, and the CLI end to end."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import run
from rich.console import Console
from tiny import char_tokenizer, save_tiny, tiny_model, tokenizer_for

from icl_probe.capture import capture_targets, forward, select_blocks
from icl_probe.cli.report.heads import print_heads
from icl_probe.errors import InputError, ModelError, UsageError
from icl_probe.heads import score_heads
from icl_probe.headscores import repeated_sequences
from icl_probe.headsplit import integrate
from icl_probe.hooks import hooked
from icl_probe.inputs import tokenize
from icl_probe.lowrank import kl_divergence
from icl_probe.update import SequentialRun

CONTEXT, QUERY = "ab -> ba\ncd -> dc\ngh -> hg\n", "ef ->"
FAMILIES = ("llama", "qwen2", "gemma3_text")  # grouped-query (4 query heads, 2 key-value heads), and post-norm


def eager_model(name: str):
    m = tiny_model(name)
    m.set_attn_implementation("eager")
    return m, tokenizer_for(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rms(y: torch.Tensor, norm, plus_one: bool) -> torch.Tensor:
    """The test's own float64 RMSNorm: y / rms(y) · w (Llama) or · (1 + w) (Gemma)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    w = norm.weight.detach().double()
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * ((1 + w) if plus_one else w)


def own_runs(model, tok):
    """o_proj input and output at the last token, with context and in the sequential patched run; the run."""
    prompt = tokenize(tok, CONTEXT, QUERY)
    chosen = select_blocks(model, None)
    seen = {"ctx": {}, "zero": {}}

    def hooks(key):
        def record(i):
            def hook(module, args, output):
                seen[key][i] = (args[0][0, -1].double().clone(), output[0, -1].double().clone())

            return hook

        return [(b.module.self_attn.o_proj, record(b.index)) for b in chosen]

    with torch.no_grad():
        with hooked(hooks("ctx")):
            targets, _ = capture_targets(model, chosen, prompt.full)
        run = SequentialRun(chosen, targets, "bias", 1)
        with run.running(), hooked(hooks("zero")):
            forward(model, [prompt.query_only], use_cache=False)
    return chosen, targets, run, seen


@pytest.mark.parametrize("name", FAMILIES)
def test_split_against_dense_computations(name):
    model, tok = eager_model(name)
    result = score_heads(model, tok, CONTEXT, QUERY, knockout=None)
    chosen, targets, run, seen = own_runs(model, tok)
    gemma = name.startswith("gemma")
    patch = run.patch(0)
    for b, s in zip(chosen, result.layers):
        attn = b.module.self_attn
        H = model.config.num_attention_heads
        assert s.num_heads == H and s.num_key_value_heads == model.config.num_key_value_heads  # per query head
        dh = attn.o_proj.in_features // H
        (o_C, y_C), (o_0, y_0) = seen["ctx"][b.index], seen["zero"][b.index]
        W = attn.o_proj.weight.detach().double()
        own = torch.stack([W[:, h * dh : (h + 1) * dh] @ (o_C - o_0)[h * dh : (h + 1) * dh] for h in range(H)])
        delta_a = y_C - y_0  # dense, from o_proj's outputs
        assert rel(s.pieces["delta_a"], own) < 1e-12
        assert rel(own.sum(0), delta_a) < 1e-10
        assert abs(sum(e["share_delta_a"] for e in s.heads) - 1) < 1e-12
        for h, e in enumerate(s.heads):
            assert abs(e["delta_a_norm"] - float(own[h].norm())) < 1e-12 * float(own[h].norm()) + 1e-15
            assert abs(e["share_delta_a"] - float(own[h] @ delta_a) / float(delta_a @ delta_a)) < 1e-10
        delta_b = run.record(b).delta_b[0]
        if not gemma:  # Δb is the attention change: its split is Δa's, exact
            assert rel(own.sum(0), delta_b) < 1e-10
        else:  # through the post-attention norm: within the reported quadrature error
            post = b.module.post_attention_layernorm
            exact = rms(y_C, post, True) - rms(y_0, post, True)
            assert rel(s.pieces["delta_b"].sum(0), exact) <= s.quadrature_error_delta_b + 1e-13
        check_integrated_gradients(b, s, targets[b.index], run.record(b), gemma)
        check_delta_w_shares(b, s, patch, run.record(b).z0[0])


def check_integrated_gradients(b, s, target, rec, gemma: bool) -> None:
    """Σ pieces = F(x_C) − F(x_0), F written here, within the reported quadrature error; and ≈ the model's Δz."""
    d = s.pieces["x_C"].shape[0] // 2
    pre = b.module.pre_feedforward_layernorm if gemma else b.module.post_attention_layernorm

    def F(x):
        y = x[d:]
        branch = rms(y, b.module.post_attention_layernorm, True) if gemma else y
        return rms(x[:d] + branch, pre, gemma)

    exact = F(s.pieces["x_C"]) - F(s.pieces["x_0"])
    assert s.quadrature_error < 1e-6
    assert rel(s.pieces["z"].sum(0), exact) <= s.quadrature_error + 1e-13
    model_dz = target.z_ctx[0] - rec.z0[0]
    assert rel(s.pieces["z"].sum(0), model_dz) <= s.quadrature_error + s.delta_z_model_gap + 1e-12
    assert s.delta_z_model_gap < 1e-6  # the model's float32 norms, in a float64 model


def check_delta_w_shares(b, s, patch, z0) -> None:
    """share_delta_w = ⟨ΔW_h, ΔW⟩_F / ‖ΔW‖²_F with ΔW_h = W p_h z0ᵀ / ‖z0‖² and ΔW the engine's patch."""
    inner = torch.zeros(s.num_heads, dtype=torch.float64)
    total = 0.0
    for path, module in b.first.items():
        dense = patch.low_rank[path].u @ patch.low_rank[path].v.T  # (out, in)
        W = module.weight.detach().double()
        for h in range(s.num_heads):
            inner[h] += float(((W @ s.pieces["z"][h])[:, None] * z0[None] / (z0 @ z0) * dense).sum())
        total += float((dense * dense).sum())
    assert abs(s.delta_w_norm - total**0.5) < 1e-9 * total**0.5
    for h, e in enumerate(s.heads):
        assert abs(e["share_delta_w"] - float(inner[h]) / total) < 1e-9
    assert abs(s.share_delta_w_sum - 1) < 1e-6


def test_integrate_is_exact_on_a_quadratic():
    x0, x1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)
    d = torch.stack([(x1 - x0) * torch.tensor([1.0, 0, 0]), (x1 - x0) * torch.tensor([0, 1.0, 1.0])])
    out = integrate(lambda x: x * x, x0, x1, d)
    own = 2 * (x0 + x1) / 2 * d  # ∫ 2 x(t) ⊙ d_k dt = (x0 + x1) ⊙ d_k
    assert rel(out.pieces, own) < 1e-14 and out.error < 1e-14


def test_scores_against_attention_weights():
    model, tok = eager_model("llama")
    ids = repeated_sequences(tok, model.config.vocab_size, [], 16, 3, seed=5)
    again = repeated_sequences(tok, model.config.vocab_size, [], 16, 3, seed=5)
    assert torch.equal(ids, again) and torch.equal(ids[:, :16], ids[:, 16:])
    assert all(len(set(row[:16].tolist())) == 16 for row in ids)
    assert not set(ids.flatten().tolist()) & set(tok.all_special_ids)
    from icl_probe.headscores import induction_scores
    from icl_probe.headsplit import head_parts

    blocks = select_blocks(model, None)
    parts = {b.index: head_parts(b, model.config) for b in blocks}
    found = induction_scores(model, parts, ids, 0, 16)
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True).attentions  # (B, H, L, L) per layer
    for layer, w in enumerate(weights):
        for h in range(model.config.num_attention_heads):
            ind = [float(w[s, h, 16 + j, j + 1]) for s in range(3) for j in range(16)]
            prev = [float(w[s, h, q, q - 1]) for s in range(3) for q in range(1, 32)]
            assert abs(found.induction[layer][h] - sum(ind) / len(ind)) < 1e-12
            assert abs(found.previous_token[layer][h] - sum(prev) / len(prev)) < 1e-12


def test_knockout_against_a_forward_written_here():
    model, tok = eager_model("llama")
    result = score_heads(model, tok, CONTEXT, QUERY, knockout=(2,), draws=1)
    prompt = tokenize(tok, CONTEXT, QUERY)
    k = len(prompt.query)
    H = model.config.num_attention_heads
    dh = model.config.hidden_size // H
    layers = model.model.layers
    alone = {}
    with torch.no_grad():
        hooks = [(layer.self_attn.o_proj, lambda m, a, o, i=i: alone.__setitem__(i, a[0][0, -k:].clone()))
                 for i, layer in enumerate(layers)]  # fmt: skip
        with hooked(hooks):
            model(input_ids=torch.tensor([prompt.query_only]))
        icl = model(input_ids=torch.tensor([prompt.full])).logits[0, -1]

    def knocked(heads_set, run=None):
        def pre(i, hs):
            def hook(module, args):
                x = args[0].clone()
                for h in hs:
                    x[0, -k:, h * dh : (h + 1) * dh] = alone[i][:, h * dh : (h + 1) * dh]
                return (x,)

            return hook

        handles = [layers[i].self_attn.o_proj.register_forward_pre_hook(pre(i, [h for j, h in heads_set if j == i]))
                   for i in {j for j, _ in heads_set}]  # fmt: skip
        try:
            with torch.no_grad():
                return run() if run else model(input_ids=torch.tensor([prompt.full])).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()

    def remaining(heads_set) -> float:
        """‖ΔW‖_F over all layers of the update solved on targets captured under the knockout."""
        chosen = select_blocks(model, None)
        targets, _ = knocked(heads_set, lambda: capture_targets(model, chosen, prompt.full))
        run = SequentialRun(chosen, targets, "bias", 1)
        with torch.no_grad(), run.running():
            forward(model, [prompt.query_only], use_cache=False)
        return sum(float((d.u @ d.v.T).pow(2).sum()) for d in run.patch(0).low_rank.values()) ** 0.5

    clean = result.knockout["clean"]
    assert abs(clean["delta_w_norm"] - sum(s.delta_w_norm**2 for s in result.layers) ** 0.5) < 1e-9
    for row in result.knockout["rows"]:
        logits = knocked([tuple(h) for h in row["heads"]])
        assert abs(row["kl"] - kl_divergence(icl, logits)) < 1e-12
        assert row["accuracy"] == float(int(logits.argmax()) == int(icl.argmax()))
        assert abs(row["delta_w_norm"] - remaining([tuple(h) for h in row["heads"]])) < 1e-9 * row["delta_w_norm"]
    for s in result.layers:
        for e in s.heads:
            assert abs(e["knockout_kl"] - kl_divergence(icl, knocked([(s.layer, e["head"])]))) < 1e-12
    assert clean["kl"] < 1e-12 and clean["accuracy"] == 1.0


def test_non_attention_mixer_is_one_unit(monkeypatch):
    import tiny

    swapped = {**tiny.CONFIGS["lfm2"], "model_type": "lfm2", "layer_types": ["full_attention", "conv"]}
    monkeypatch.setitem(tiny.CONFIGS, "lfm2-attention-first", swapped)  # the conv layer then sees the context
    model, tok = tiny_model("lfm2-attention-first"), char_tokenizer()
    result = score_heads(model, tok, CONTEXT, QUERY, knockout=None)
    attention, conv = result.layers
    assert [e["head"] for e in conv.heads] == [conv.mixer] and conv.mixer != "attention"
    assert conv.delta_w_norm > 1e-3 and conv.quadrature_error < 1e-6
    assert abs(conv.heads[0]["share_delta_a"] - 1) < 1e-12
    assert abs(conv.share_delta_w_sum - 1) < 1e-6 and abs(attention.share_delta_w_sum - 1) < 1e-6
    assert len(attention.heads) == model.config.num_attention_heads
    assert conv.heads[0]["induction_score"] is None and attention.heads[0]["induction_score"] is not None


def test_bad_input():
    model, tok = tiny_model("lfm2"), char_tokenizer()
    with pytest.raises(InputError, match="no attention heads"):
        score_heads(model, tok, CONTEXT, QUERY, layers="0", knockout=None)
    llama, tok = eager_model("llama")
    with pytest.raises(UsageError, match="larger than the 8 attention heads"):
        score_heads(llama, tok, CONTEXT, QUERY, knockout=(9,))
    with pytest.raises(ModelError, match="parallel"):
        score_heads(tiny_model("gpt_neox"), tok, CONTEXT, QUERY, knockout=None)


def test_cli_end_to_end(tmp_path):
    folder = save_tiny(tiny_model("llama", torch.float32), char_tokenizer(), tmp_path / "m")
    out, png = tmp_path / "h.json", tmp_path / "h.png"
    result = run("heads", "-m", folder, "--context", CONTEXT, "--query", QUERY, "--knockout", "1,2", "--draws", "2",
                 "--json", out, "--plot", png, columns=80)  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    console = Console(width=80, record=True, file=io.StringIO())
    print_heads(console, doc)
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80 and not any("…" in line for line in lines)
    assert "Δb closes the gap at every block by construction" in " ".join(line.strip() for line in lines)
    assert doc["schema"] == "icl-probe.heads/1" and png.stat().st_size > 0
    keys = {"head", "delta_a_norm", "share_delta_a", "share_delta_w", "share_delta_b", "induction_score",
            "previous_token_score", "context_attention"}  # fmt: skip
    assert keys <= set(doc["layers"][0]["heads"][0])
    assert {r["ranking"] for r in doc["knockout"]["rows"]} == {"delta_w", "induction", "random"}
    bad = run("heads", "-m", folder, "--knockout", "99", columns=80)
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "larger than" in bad.stderr


def hand_built_induction_model():
    """A 2-layer GPT-2 whose layer-0 head 0 attends to the previous token and copies it into a block of the
    residual stream, and whose layer-1 head 0 attends where that copied token equals the current one: an
    induction head by construction. Every other weight is 0 (head 1 of each layer attends uniformly)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    V, L = len(char_tokenizer().get_vocab()), 80
    d = 2 * V + L + (2 * V + L) % 2
    hd = d // 2
    TOK, POS, PREV = 0, V, V + L  # block offsets in the residual stream
    config = GPT2Config(vocab_size=V, n_positions=L, n_embd=d, n_layer=2, n_head=2, n_inner=4,
                        attn_implementation="eager")  # fmt: skip
    model = GPT2LMHeadModel(config).double().eval()
    eye = torch.eye
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
        model.transformer.wte.weight[:, TOK : TOK + V] = eye(V)
        model.transformer.wpe.weight[:, POS : POS + L] = eye(L)
        qkv0 = model.transformer.h[0].attn.c_attn.weight  # Conv1D (in, 3 d): x @ W
        qkv0[POS : POS + L, 0:L] = 2.0 * eye(L)  # q_i = position i
        qkv0[POS : POS + L - 1, d + 1 : d + L] = eye(L - 1)  # k_j = position j + 1: q_i · k_j peaks at j = i − 1
        qkv0[TOK : TOK + V, 2 * d : 2 * d + V] = eye(V)  # v = the token
        model.transformer.h[0].attn.c_proj.weight[0:V, PREV : PREV + V] = eye(V) / 12  # into the PREV block
        qkv1 = model.transformer.h[1].attn.c_attn.weight
        qkv1[TOK : TOK + V, 0:V] = 3.0 * eye(V)  # q = the current token
        qkv1[PREV : PREV + V, d : d + V] = eye(V)  # k = the previous token copied by layer 0
    assert hd >= max(V, L)
    return model


def test_hand_built_induction_head_ranks_first():
    from icl_probe.headscores import induction_scores
    from icl_probe.headsplit import head_parts

    model, tok = hand_built_induction_model(), char_tokenizer()
    ids = repeated_sequences(tok, model.config.vocab_size, [], 32, 4, seed=1)
    parts = {b.index: head_parts(b, model.config) for b in select_blocks(model, None)}
    found = induction_scores(model, parts, ids, 0, 32)
    induction = torch.stack([found.induction[i] for i in (0, 1)])  # (layer, head)
    previous = torch.stack([found.previous_token[i] for i in (0, 1)])
    assert int(induction.argmax()) == 2 and float(induction[1, 0]) > 0.9  # layer 1, head 0
    assert float(induction.flatten().sort().values[-2]) < 0.2
    assert int(previous.argmax()) == 0 and float(previous[0, 0]) > 0.9  # layer 0, head 0
