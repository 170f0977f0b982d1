"""The update math on plain tensors, checked against dense matrices formed here on purpose."""

import types

import pytest
import torch

from icl_probe.errors import MathError
from icl_probe.lowrank import (
    LowRank,
    alignment,
    all_finite,
    frobenius_inner,
    kl_divergence,
    rank_one_map,
    rank_one_update,
)
from icl_probe.metrics import Scorer, top_rows, top_tokens


def random_case(out=7, inp=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    return w, torch.randn(inp, generator=gen, dtype=torch.float64), torch.randn(inp, generator=gen, dtype=torch.float64)


def test_update_maps_z0_to_w_dz():
    w, z_ctx, z0 = random_case()
    delta = rank_one_update(w, z_ctx, z0, "here")
    dense = delta.u @ delta.v.T
    torch.testing.assert_close(dense @ z0, w @ (z_ctx - z0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((w + dense) @ z0, w @ z_ctx, rtol=1e-12, atol=1e-12)
    assert delta.u.shape == (7, 1) and delta.v.shape == (5, 1)  # (out, 1) and (in, 1)
    assert int(torch.linalg.matrix_rank(dense, rtol=1e-10)) == 1 == delta.rank()


def test_update_matches_paper_formula():
    w, z_ctx, z0 = random_case(seed=1)
    delta = rank_one_update(w, z_ctx, z0, "here")
    expected = torch.outer(w @ (z_ctx - z0), z0) / z0.dot(z0)  # Dherin et al., Theorem 2.2
    torch.testing.assert_close(delta.u @ delta.v.T, expected, rtol=1e-12, atol=1e-14)


def test_norms_and_inner_products_match_dense():
    w, z_ctx, z0 = random_case(seed=2)
    a = rank_one_update(w, z_ctx, z0, "a")
    b = LowRank(torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    da, db = a.u @ a.v.T, b.u @ b.v.T
    assert a.frobenius_norm() == pytest.approx(float(torch.linalg.norm(da)), rel=1e-12)
    assert frobenius_inner(a, b) == pytest.approx(float((da * db).sum()), rel=1e-12)
    assert alignment(a, b) == pytest.approx(float((da * db).sum() / da.norm() / db.norm()), rel=1e-12)
    assert b.rank() == 3


def test_apply_matches_dense_at_every_position():
    w, z_ctx, z0 = random_case(seed=3)
    delta = rank_one_update(w, z_ctx, z0, "a")
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(delta.apply(x), x @ (delta.u @ delta.v.T).T)


def test_rank_one_map_hits_target():
    p, target = torch.randn(9, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    fold = rank_one_map(target, p, "down")
    torch.testing.assert_close(fold.apply(p), target)


def test_tiny_z0_is_refused_with_its_place():
    w, z_ctx, _ = random_case()
    with pytest.raises(MathError, match="model.layers.3.mlp.gate_proj"):
        rank_one_update(w, z_ctx, torch.zeros(5, dtype=torch.float64), "model.layers.3.mlp.gate_proj")
    with pytest.raises(MathError, match="non-finite"):
        rank_one_update(w, z_ctx, torch.full((5,), float("nan")), "layer 1")


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(50)
    assert kl_divergence(logits, logits) == 0.0
    assert kl_divergence(logits, logits.flip(0)) > 0.0


def test_kl_of_logits_autograd_records_is_the_dense_sum_without_a_warning(recwarn):
    """Logits from a pass outside torch.no_grad(): the KL is the float64 sum Σ p (log p − log q) formed here."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    p_logits, q_logits = (weight @ torch.randn(8, generator=gen) for _ in range(2))  # both record their graph
    log_p, log_q = (torch.log_softmax(x.detach().double(), -1) for x in (p_logits, q_logits))
    expected = float((log_p.exp() * (log_p - log_q)).sum())
    assert kl_divergence(p_logits, q_logits) == pytest.approx(expected, rel=1e-12)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


@pytest.mark.parametrize("batched", [False, True])
def test_added_to_is_y_plus_delta_w_x_summed_in_float64_and_rounded_once(batched):
    """`added_to` against a dense ΔW formed here: y + ΔW x in float64, rounded once to float32 (the fused product
    may round its float64 sum by one float64 ulp differently, which moves the float32 result by at most one ulp)."""
    gen = torch.Generator().manual_seed(3)
    rows, out, inp, positions = (3 if batched else 1), 6, 4, 5
    u = torch.randn(rows, out, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(rows, inp, 2, generator=gen, dtype=torch.float64)
    delta = LowRank(u, v) if batched else LowRank(u[0], v[0])
    x = torch.randn(rows, positions, inp, generator=gen)
    y = torch.randn(rows, positions, out, generator=gen)
    dense = u @ v.mT  # (rows, out, in)
    expected = (y.double() + x.double() @ dense.mT).float()
    before = y.clone()
    got = delta.added_to(y, x)
    assert got.dtype == torch.float32 and got.shape == y.shape
    torch.testing.assert_close(got, expected, rtol=2**-23, atol=1e-30)
    assert torch.equal(y, before)  # y itself is left as it was


def test_scorer_gives_kl_divergence_and_top1_to_the_last_bit():
    """metrics.Scorer computes the reference's log-probabilities once; every KL must still be kl_divergence's."""
    gen = torch.Generator().manual_seed(4)
    ctx = torch.randn(50, generator=gen)
    others = [torch.randn(50, generator=gen), ctx.clone(), ctx + 1e-3 * torch.randn(50, generator=gen)]
    ref = Scorer(ctx)
    for q in others:
        assert ref.kl(q) == kl_divergence(ctx, q)
        assert ref.score(q) == {"kl": kl_divergence(ctx, q), "top1_match": bool(ctx.argmax() == q.argmax())}
    assert ref.kl(ctx.clone()) == 0.0


@pytest.mark.parametrize("vocab", [3000, 49152])
def test_scorer_rows_score_as_each_row_alone(vocab):
    """A Scorer of n rows takes one log-softmax and one sum per pair of kinds for all of them. Its KLs must be each row
    alone's (a dense float64 softmax's, independently) within float64 rounding: to the last bit below torch's
    parallel-sum grain (3000), within 1e-13 relative above it (49152, SmolLM2's vocabulary), where a row summed alone
    splits its sum across threads. Top-1 and top-k ids must be each row's exactly, the top-k probabilities the
    softmax's within 1e-14 relative."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, vocab, generator=gen) * 4
    rows = Scorer(logits)
    kls = rows.kls(Scorer(logits.roll(1, 0)))
    scores = rows.scores(Scorer(logits.roll(1, 0)))
    tok = types.SimpleNamespace(decode=lambda ids: str(ids[0]))
    tops = top_rows(tok, rows, 7)
    for i in range(6):
        p, q = torch.softmax(logits[i].double(), -1), torch.softmax(logits[i - 1].double(), -1)
        dense = float((p * (p.log() - q.log())).sum())
        alone = kl_divergence(logits[i], logits[i - 1])
        assert float(kls[i]) == pytest.approx(dense, rel=1e-12)
        if vocab <= 3000:
            assert float(kls[i]) == alone
        else:
            assert float(kls[i]) == pytest.approx(alone, rel=1e-13, abs=0)
        assert scores[i]["top1_match"] == bool(logits[i].argmax() == logits[i - 1].argmax())
        assert tops[i] == top_tokens(tok, logits[i].clone(), 7)
        assert [t["id"] for t in tops[i]] == torch.topk(p, 7).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["prob"] for t in tops[i]], dtype=torch.float64),
                                   torch.topk(p, 7).values, rtol=1e-14, atol=0)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite_everywhere(dtype):
    """all_finite reads a tensor's extremes only; isfinite looks at every value. A NaN, +inf or -inf at any place,
    alone or together, and huge finite values must give the same answer."""
    gen = torch.Generator().manual_seed(5)
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    for trial in range(60):
        x = (torch.randn(4, 9, generator=gen) * 10.0 ** int(torch.randint(0, 4, (1,), generator=gen))).to(dtype)
        if trial % 6 == 5:
            x[0, 0] = torch.finfo(dtype).max  # finite, however large
        for bad in [float("nan"), float("inf"), float("-inf")][: trial % 4]:
            x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=gen))] = bad
        assert all_finite(x) == bool(torch.isfinite(x).all()), (trial, x)
