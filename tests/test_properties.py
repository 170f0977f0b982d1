"""Property tests (hypothesis) with random shapes and values: the update math, applying and removing a
patch, the --layers parser and the patch loader.

Tolerances are rounding-error bounds derived for each check (unit roundoff u, inner length n),
not fitted to observed errors.
"""

import functools
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny import tiny_model

from icl_probe.errors import MathError, PatchError, UsageError
from icl_probe.inputs import parse_layers
from icl_probe.lowrank import MIN_Z0_NORM, LowRank, alignment, frobenius_inner, rank_one_map, rank_one_update
from icl_probe.patchfile import READABLE, REQUIRED_KEYS, load_patch, save_patch
from icl_probe.patching import Patch, applied

U64 = 2.0**-53  # unit roundoff of float64
U32 = 2.0**-24
GOLDEN = Path(__file__).parent / "data" / "golden" / "patch-v1.safetensors"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dims = st.integers(1, 24)


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    """Random values times a power of two: small integers (exact in float32, never subnormal), drawn one by
    one for small tensors or from a seed for large ones, or Gaussians."""
    n = 1
    for s in shape:
        n *= s
    scale = 2.0 ** draw(st.integers(-20, 20))
    kind = draw(st.sampled_from(["drawn", "integers", "gaussian"] if n <= 48 else ["integers", "gaussian"]))
    if kind == "drawn":
        values = torch.tensor(draw(st.lists(st.integers(-(2**11), 2**11), min_size=n, max_size=n)), dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        if kind == "integers":
            values = torch.randint(-(2**11), 2**11 + 1, (n,), generator=gen).double()
        else:
            values = torch.randn(n, generator=gen, dtype=torch.float64)
    return (values.reshape(shape) * scale).to(dtype)


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense(d: LowRank) -> torch.Tensor:
    return d.u @ d.v.T


# ---- the update math -----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data(), out=dims, inp=dims, weight_dtype=st.sampled_from([torch.float64, torch.float32]))
def test_update_maps_z0_to_w_dz_or_refuses(data, out, inp, weight_dtype):
    w = data.draw(tensors((out, inp), weight_dtype))
    z_ctx, z0 = data.draw(tensors((inp,))), data.draw(tensors((inp,)))
    if float(torch.dot(z0, z0).sqrt()) < MIN_Z0_NORM:
        with pytest.raises(MathError, match="model.layers.7.mlp.up_proj"):
            rank_one_update(w, z_ctx, z0, "model.layers.7.mlp.up_proj")
        return
    delta = rank_one_update(w, z_ctx, z0, "model.layers.7.mlp.up_proj")
    dz = z_ctx - z0
    exact = w.double() @ dz
    # W dz is formed in the weight's dtype (n products, and dz rounded to it), then scaled by
    # z0·z0 / z0·z0 in float64 (two dot products of length n): a γ-style bound on |W| |dz|.
    work_u = U64 if weight_dtype == torch.float64 else U32
    bound = ((inp + 2) * work_u + 4 * (inp + 2) * U64) * (w.double().abs() @ dz.abs())
    assert ((delta.apply(z0) - exact).abs() <= bound).all()
    assert delta.u.shape == (out, 1) and delta.v.shape == (inp, 1)
    assert delta.u.dtype == delta.v.dtype == torch.float64


@settings(max_examples=100, deadline=None)
@given(out=dims, inp=dims, k=st.integers(1, 6), r=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_rank_is_the_rank_of_the_dense_update(out, inp, k, r, seed):
    # u = A B with A (out, k), B (k, r): generically rank(u vᵀ) = min(out, inp, k, r).
    u = gaussian(out, k, seed=seed) @ gaussian(k, r, seed=seed + 1)
    delta = LowRank(u, gaussian(inp, r, seed=seed + 2))
    expected = min(out, inp, k, r)
    assert delta.rank() == expected == int(torch.linalg.matrix_rank(dense(delta)))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), out=dims, inp=dims)
def test_rank_one_update_has_rank_one_unless_zero(data, out, inp):
    w = data.draw(tensors((out, inp)))
    z_ctx, z0 = data.draw(tensors((inp,))), data.draw(tensors((inp,)))
    assume(float(torch.dot(z0, z0).sqrt()) >= MIN_Z0_NORM)
    delta = rank_one_update(w, z_ctx, z0, "here")
    assert delta.u.shape == (out, 1) and delta.v.shape == (inp, 1)
    # The dense ΔW is an outer product of two vectors, so its singular values past the first are rounding.
    expected = 0 if torch.all(w @ (z_ctx - z0) == 0) else 1
    assert int(torch.linalg.matrix_rank(dense(delta), rtol=1e-10)) == expected == delta.rank()


@settings(max_examples=80, deadline=None)
@given(data=st.data(), out=dims, inp=dims, ra=st.integers(1, 4), rb=st.integers(1, 4))
def test_factor_norms_equal_dense_norms(data, out, inp, ra, rb):
    a = LowRank(data.draw(tensors((out, ra))), data.draw(tensors((inp, ra))))
    b = LowRank(data.draw(tensors((out, rb))), data.draw(tensors((inp, rb))))
    da, db = dense(a), dense(b)
    # Both sides round sums of (out + inp + r) products; the error is relative to the factors' sizes,
    # which can exceed ‖ΔW‖ when the factors cancel.
    c = 8 * (out + inp + ra + rb) * U64
    size_a, size_b = float(a.u.norm() * a.v.norm()), float(b.u.norm() * b.v.norm())
    assert abs(a.frobenius_norm() ** 2 - float((da * da).sum())) <= c * size_a**2
    assert abs(frobenius_inner(a, b) - float((da * db).sum())) <= c * size_a * size_b
    na, nb = float(da.norm()), float(db.norm())
    if na > 1e-6 * size_a and nb > 1e-6 * size_b:  # well away from cancellation, compare the cosine too
        cosine = float((da * db).sum()) / (na * nb)
        assert alignment(a, b) == pytest.approx(cosine, abs=1e-6)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), out=dims, inp=dims, r=st.integers(1, 4), lead=st.lists(st.integers(1, 3), max_size=2))
def test_apply_equals_the_dense_product_at_every_position(data, out, inp, r, lead):
    delta = LowRank(data.draw(tensors((out, r))), data.draw(tensors((inp, r))))
    x = data.draw(tensors((*lead, inp)))
    got, want = delta.apply(x), x @ dense(delta).T
    bound = 4 * (inp + r) * U64 * (x.abs() @ (delta.v.abs() @ delta.u.abs().T))
    assert got.shape == (*lead, out)
    assert ((got - want).abs() <= bound).all()


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    out=dims,
    inp=dims,
    weight_dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_batched_update_is_the_theorems_update_of_each_row(data, rows, out, inp, weight_dtype):
    w = data.draw(tensors((out, inp), weight_dtype))
    z_ctx, z0 = data.draw(tensors((rows, inp))), data.draw(tensors((rows, inp)))
    assume(bool(((z0 * z0).sum(-1).sqrt() >= MIN_Z0_NORM).all()))
    delta = rank_one_update(w, z_ctx, z0, "here")
    assert delta.u.shape == (rows, out, 1) and delta.v.shape == (rows, inp, 1)
    work_u = U64 if weight_dtype == torch.float64 else U32
    c = (inp + 2) * work_u + 4 * (inp + 2) * U64  # as in test_update_maps_z0_to_w_dz_or_refuses
    for b, row in enumerate(delta.rows()):
        dz = z_ctx[b] - z0[b]
        # Dherin et al., Theorem 2.2, formed densely for this row alone
        want = torch.outer(w.double() @ dz, z0[b]) / z0[b].dot(z0[b])
        bound = c * torch.outer(w.double().abs() @ dz.abs(), z0[b].abs()) / z0[b].dot(z0[b])
        assert ((dense(row) - want).abs() <= bound).all()


@settings(max_examples=80, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), t=st.integers(1, 3), out=dims, inp=dims, r=st.integers(1, 3))
def test_batched_apply_is_each_rows_dense_product(data, rows, t, out, inp, r):
    delta = LowRank(data.draw(tensors((rows, out, r))), data.draw(tensors((rows, inp, r))))
    x = data.draw(tensors((rows, t, inp)))
    got = delta.apply(x)
    assert got.shape == (rows, t, out)
    assert torch.equal(delta.apply(x.reshape(rows * t, inp)), got.reshape(rows * t, out))  # OPT's (B·T, in)
    for b in range(rows):
        u, v = delta.u[b], delta.v[b]
        bound = 4 * (inp + r) * U64 * (x[b].abs() @ (v.abs() @ u.abs().T))
        assert ((got[b] - x[b] @ (u @ v.T).T).abs() <= bound).all()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(), out=dims, inp=dims, ranks=st.lists(st.one_of(st.none(), st.integers(1, 3)), min_size=1, max_size=4)
)
def test_stacked_updates_apply_as_each_row_alone(data, out, inp, ranks):
    rows = [None if r is None else LowRank(data.draw(tensors((out, r))), data.draw(tensors((inp, r)))) for r in ranks]
    stacked = LowRank.stacked(rows, (out, inp))
    x = data.draw(tensors((len(rows), 2, inp)))
    got = stacked.apply(x)
    for b, d in enumerate(rows):
        if d is None:
            assert torch.equal(got[b], torch.zeros(2, out, dtype=torch.float64))  # a missing row is no update
            continue
        bound = 4 * (inp + d.u.shape[1]) * U64 * (x[b].abs() @ (d.v.abs() @ d.u.abs().T))
        assert ((got[b] - x[b] @ dense(d).T).abs() <= bound).all()


@settings(max_examples=80, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), out=dims, inp=dims)
def test_batched_rank_one_map_takes_each_p_to_its_target(data, rows, out, inp):
    p, target = data.draw(tensors((rows, inp))), data.draw(tensors((rows, out)))
    assume(bool(((p * p).sum(-1).sqrt() >= MIN_Z0_NORM).all()))
    fold = rank_one_map(target, p, "model.layers.0.mlp.down_proj")
    got = fold.apply(p[:, None])[:, 0]  # (B, out): row b's ΔW_b at its own p_b
    # ΔW_b p_b = target_b (p_b·p_b) / ‖p_b‖²: two dot products of length inp, then a division and a product
    bound = 4 * (inp + 2) * U64 * target.abs()
    assert ((got - target).abs() <= bound).all()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), out=dims, inp=dims, r=st.integers(1, 4))
def test_batched_core_norms_are_the_dense_norms(data, rows, out, inp, r):
    delta = LowRank(data.draw(tensors((rows, out, r))), data.draw(tensors((rows, inp, r))))
    norms = delta.core_norm()
    assert norms.shape == (rows,)
    for b in range(rows):
        u, v = delta.u[b], delta.v[b]
        size = float(
            u.norm() * v.norm()
        )  # the error is relative to the factors, as in test_factor_norms_equal_dense_norms
        c = 8 * (out + inp + 2 * r) * U64
        assert abs(float(norms[b]) ** 2 - float((u @ v.T).pow(2).sum())) <= c * size**2


@pytest.mark.parametrize("name", ["llama", "gpt2"])  # gpt2: Conv1D stores W as (in, out)
def test_the_engines_updates_are_the_dense_formulas_for_each_row(name):
    from icl_probe.capture import Target, capture_targets, select_blocks
    from icl_probe.update import solve_rows

    model, ids = tiny_model(name, torch.float64), [[5, 9, 13, 7, 21, 30], [5, 40, 22, 30]]
    queries = [[5, 21, 30], [5, 30]]
    chosen = select_blocks(model, None)
    keys = ("z_ctx", "attn", "branch", "out")
    with torch.no_grad():
        rows = [capture_targets(model, chosen, r)[0] for r in ids]
        targets = {b.index: Target(*(torch.cat([vars(t[b.index])[k] for t in rows]) for k in keys)) for b in chosen}
        solution = solve_rows(model, chosen, targets, queries, "fold")
    for i, (patch, records) in enumerate(zip(solution.patches, solution.records)):
        for b in chosen:
            z0, z_ctx = records[b.index].z0[0], targets[b.index].z_ctx[i]
            for path, m in b.first.items():
                w = m.weight.detach().T if name == "gpt2" else m.weight.detach()  # (out, in), formed here on purpose
                want = torch.outer(w @ (z_ctx - z0), z0) / z0.dot(z0)  # Dherin et al., Theorem 2.2
                torch.testing.assert_close(dense(patch.low_rank[path]), want, rtol=1e-10, atol=1e-12)
            fold = dense(patch.low_rank[b.full(b.family.down)])  # ΔW_down p_last = Δb, and rank 1 along p_last
            assert int(torch.linalg.matrix_rank(fold, rtol=1e-10)) == 1
            assert float(records[b.index].block_error[0]) < 1e-12


# ---- apply, then remove ----------------------------------------------------------------------------


@functools.cache
def model_of(dtype: torch.dtype):
    return tiny_model("llama", dtype)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


@st.composite
def patches(draw, model) -> Patch:
    """A random patch of the model: low-rank updates, residual biases and dense deltas, any sizes."""
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    blocks = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    params = sorted(n for n, _ in model.named_parameters())
    patch = Patch()
    for path in draw(st.lists(st.sampled_from(linears), unique=True, max_size=4)):
        out, inp = model.get_submodule(path).weight.shape
        r = draw(st.integers(1, 3))
        patch.low_rank[path] = LowRank(draw(tensors((out, r))), draw(tensors((inp, r))))
    for path in draw(st.lists(st.sampled_from(blocks), unique=True, max_size=2)):
        patch.residual[path] = draw(tensors((model.config.hidden_size,)))
    for name in draw(st.lists(st.sampled_from(params), unique=True, max_size=4)):
        patch.dense[name] = draw(tensors(tuple(model.get_parameter(name).shape)))
        if draw(st.booleans()):
            patch.dense[name] *= 1e30  # overflows float16 and bfloat16's range on the way in
    return patch


class Boom(Exception):
    pass


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_apply_then_remove_restores_the_model_bit_for_bit(data, dtype):
    model = model_of(dtype)
    patch = data.draw(patches(model))
    ids = torch.tensor([data.draw(st.lists(st.integers(0, model.config.vocab_size - 1), min_size=1, max_size=6))])
    before = {name: raw_bytes(t) for name, t in model.state_dict().items()}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        fail = data.draw(st.booleans())
        try:
            with applied(model, patch):
                model(input_ids=ids)  # the hooks run, and may see inf
                if fail:
                    raise Boom
        except Boom:
            pass
        after = model(input_ids=ids).logits
    assert {name: raw_bytes(t) for name, t in model.state_dict().items()} == before
    assert raw_bytes(after) == raw_bytes(logits)
    assert all(not m._forward_hooks for m in model.modules())


# ---- the --layers parser -------------------------------------------------------------------------


def check_layers_outcome(spec, n: int) -> list[int] | None:
    """A sorted, duplicate-free, non-empty list of valid indices, or a one-line UsageError naming the range."""
    try:
        layers = parse_layers(spec, n)
    except UsageError as e:
        assert "\n" not in str(e) and f"0..{n - 1}" in str(e)
        return None
    assert layers and layers == sorted(set(layers)) and all(0 <= i < n for i in layers)
    return layers


@settings(max_examples=300, deadline=None)
@given(spec=st.text(), n=st.integers(1, 64))
def test_any_text_is_a_layer_list_or_a_usage_error(spec, n):
    check_layers_outcome(spec, n)


@settings(max_examples=300, deadline=None)
@given(spec=st.text(alphabet="0123456789-+:, _al\t", max_size=14), n=st.integers(1, 64))
def test_layer_spec_lookalikes_are_a_layer_list_or_a_usage_error(spec, n):
    check_layers_outcome(spec, n)


index_part = st.integers(-80, 80).map(str)
bound = st.one_of(st.just(""), st.integers(-80, 80).map(str))
slice_part = st.tuples(bound, bound, st.one_of(st.none(), bound, st.integers(-5, 5).map(str))).map(
    lambda t: f"{t[0]}:{t[1]}" if t[2] is None else f"{t[0]}:{t[1]}:{t[2]}"
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(index_part, slice_part), min_size=1, max_size=4), n=st.integers(1, 64))
def test_layer_specs_mean_what_python_indexing_means(parts, n):
    python = list(range(n))
    expected: set[int] = set()
    valid = True
    for part in parts:
        try:
            picked = eval(f"python[{part}]", {"python": python})  # the part is built from digits, '-' and ':'
        except (IndexError, ValueError):  # an index out of range, or a slice step of 0
            valid = False
            continue
        picked = picked if isinstance(picked, list) else [picked]
        valid &= bool(picked)  # a slice that selects nothing is refused
        expected.update(i % n for i in picked)
    got = check_layers_outcome(",".join(parts), n)
    assert got == (sorted(expected) if valid else None)


# ---- the patch loader ----------------------------------------------------------------------------


def assert_valid_patch(patch: Patch, tmp_path: Path) -> None:
    """What load_patch promises: a complete, finite, well-formed patch that saves and loads back unchanged."""
    assert set(REQUIRED_KEYS) <= set(patch.metadata) and patch.metadata["format"] in READABLE
    for d in patch.low_rank.values():
        assert d.u.ndim == d.v.ndim == 2 and d.u.shape[1] == d.v.shape[1] >= 1
    assert all(b.ndim == 1 for b in patch.residual.values())
    everything = [
        *patch.residual.values(),
        *patch.dense.values(),
        *(t for d in patch.low_rank.values() for t in (d.u, d.v)),
    ]
    assert everything and all(t.dtype == torch.float64 and torch.isfinite(t).all() for t in everything)
    save_patch(patch, tmp_path / "again.safetensors", force=True)
    again = load_patch(tmp_path / "again.safetensors")
    assert again.metadata == patch.metadata
    assert all(
        torch.equal(again.low_rank[k].u, d.u) and torch.equal(again.low_rank[k].v, d.v)
        for k, d in patch.low_rank.items()
    )


def load_outcome(data: bytes, tmp_path: Path) -> str:
    """Load `data` as a patch file: 'error' for a clean one-line PatchError, 'patch' for a valid patch."""
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        patch = load_patch(path)
    except PatchError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return "error"
    assert_valid_patch(patch, tmp_path)
    return "patch"


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes, length_delta: int = 0) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "f32", ""]
# Edits that safetensors itself rejects (sizes, offsets, lengths) and edits it accepts, left to our checks.
EDITS = ["meta-drop", "meta-set", "meta-version", "meta-not-str", "dtype", "shape", "offsets", "drop", "rename",
         "any-value", "length", "non-finite", "body-cut", "dtype-4-bytes", "reshape", "suffix"]  # fmt: skip
SUFFIXES = ["delta_u", "delta_v", "delta_residual", "delta"]


@st.composite
def same_size_shape(draw, numel: int) -> list[int]:
    """A random shape of 1 to 3 dimensions with `numel` elements."""
    shape = []
    for _ in range(draw(st.integers(0, 2))):
        d = draw(st.sampled_from([d for d in range(1, numel + 1) if numel % d == 0]))
        shape.append(d)
        numel //= d
    return draw(st.permutations([*shape, numel]))


NON_FINITE = [struct.pack("<f", x) for x in (float("nan"), float("inf"), float("-inf"))]


@st.composite
def mutated_header(draw) -> bytes:
    """The golden patch with one to three structural edits of its safetensors header or data."""
    header, body = split(GOLDEN.read_bytes())
    meta = header["__metadata__"]
    names = sorted(k for k in header if k != "__metadata__")
    length_delta = 0
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        edit = draw(st.sampled_from(EDITS))
        if edit == "meta-drop":
            meta.pop(draw(st.sampled_from(sorted(meta) or ["format"])), None)
        elif edit == "meta-set":
            meta[draw(st.sampled_from([*REQUIRED_KEYS, "extra"]))] = draw(st.text(max_size=20))
        elif edit == "meta-version":
            meta["format"] = draw(st.sampled_from(["icl-probe.patch/3", "icl-probe.patch/0", "icl-probe.patch/", ""]))
        elif edit == "meta-not-str":
            meta[draw(st.sampled_from(REQUIRED_KEYS))] = draw(json_values)
        elif edit == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif edit == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.integers(-1, 6), max_size=3))
        elif edit == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = sorted(draw(st.lists(st.integers(0, len(body) + 16), min_size=2, max_size=2)))
        elif edit == "drop":
            header.pop(name, None)
        elif edit == "rename" and isinstance(entry, dict):
            new = draw(
                st.sampled_from([name.replace("delta_u", "delta_v"), name + "x", "delta_u", ".delta_u", name.upper()])
            )
            header[new] = header.pop(name)
        elif edit == "any-value":
            header[name] = draw(json_values)
        elif edit == "length":
            length_delta = draw(st.integers(-16, 16))
        elif edit == "non-finite" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            start, stop = entry["data_offsets"]
            at = start + 4 * draw(st.integers(0, max(0, (stop - start) // 4 - 1)))
            body = body[:at] + draw(st.sampled_from(NON_FINITE)) + body[at + 4 :]
        elif edit == "dtype-4-bytes" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(["I32", "U32"]))
        elif edit == "reshape" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            numel = 1
            for d in entry["shape"]:
                numel *= d if isinstance(d, int) else 1
            entry["shape"] = draw(same_size_shape(max(numel, 1)))
        elif edit == "suffix" and isinstance(entry, dict):
            header[name.rpartition(".")[0] + "." + draw(st.sampled_from(SUFFIXES))] = header.pop(name)
        elif edit == "body-cut":
            body = body[: draw(st.integers(0, len(body)))]
    if draw(st.booleans()):
        header["__metadata__"] = meta
    else:
        header.pop("__metadata__", None) if not meta else None
    return join(header, body, length_delta)


def test_the_unmutated_golden_patch_is_valid(tmp_path):
    assert load_outcome(GOLDEN.read_bytes(), tmp_path) == "patch"


@FUZZ
@given(data=mutated_header())
def test_mutated_headers_give_a_clean_error_or_a_valid_patch(tmp_path, data):
    load_outcome(data, tmp_path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_give_a_clean_error(tmp_path, data):
    assert load_outcome(data, tmp_path) == "error"


@FUZZ
@given(header=json_values, body=st.binary(max_size=64), length_delta=st.integers(-8, 8))
def test_random_headers_with_a_valid_length_prefix_give_a_clean_error(tmp_path, header, body, length_delta):
    text = json.dumps(header).encode()
    assert load_outcome(struct.pack("<Q", max(0, len(text) + length_delta)) + text + body, tmp_path) == "error"
