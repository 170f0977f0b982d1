"""MLPs called with tensors besides z, on a tiny float64 Llama whose blocks pass their MLP a second input: the
structural rule accepts one that holds a row per position, the run is exact when that input is the same with and
without the context (as DeepSeek-V4's token ids are), and refused naming the obstacle when the context reaches it;
one that is not a row per position is refused as icl-probe's limitation. Also the pieces: cutting a call's other
inputs to the last token, and comparing them."""

import types

import pytest
import torch
from tiny import char_tokenizer, tiny_model
from torch import nn

from icl_probe import analyze, decoder
from icl_probe.batched import analyze_rows
from icl_probe.errors import ModelError
from icl_probe.hooks import Call
from icl_probe.mlp_inputs import MlpInputs, inputs_at_last

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"


class Modulated(nn.Module):
    """A dense MLP whose hidden units are scaled by a second input s: down(relu(up(x)) · (1 + mean(s)))."""

    def __init__(self, d: int, i: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, i), nn.Linear(i, d)

    def forward(self, x, s):
        return self.down_proj(torch.relu(self.up_proj(x)) * (1 + s.mean(-1, keepdim=True)))


def passing(second):
    """A Llama block's forward that calls its MLP with `second(residual stream, input ids shape)` as well."""

    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        h = residual + h
        return h + self.mlp(self.post_attention_layernorm(h), second(h))

    return forward


def model_with(second):
    model = tiny_model("llama")
    model.config.model_type = "llama_unlisted"  # read by the structural rule
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = Modulated(32, 64).double()
        layer.forward = types.MethodType(passing(second), layer)
    return model


def test_a_second_input_the_context_does_not_change_is_exact():
    # a row per position, the same at every position with and without the context (as token ids are)
    model = model_with(lambda h: torch.full_like(h, 0.5))
    assert [b.family.mlp_inputs for b in decoder.blocks(model)] == [("s",), ("s",)]
    doc = analyze(model, char_tokenizer(), CONTEXT, QUERY).to_dict()
    assert doc["logits"]["kl_no_context"] > 1e-3 and doc["logits"]["kl_patched"] < 1e-10
    assert max(layer["block_error"] for layer in doc["layers"]) < 1e-9
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-9


def test_a_second_input_in_a_batch_is_compared_on_the_solved_rows():
    # the ablation's rows ride in the solve's pass (update.Rider): only the solved rows' inputs meet the targets
    model = model_with(lambda h: torch.full_like(h, 0.5))
    prompts = [(CONTEXT, QUERY), ("ab -> ba\n", "cd ->")]
    docs = [a.to_dict() for a in analyze_rows(model, char_tokenizer(), prompts)]
    for doc, (context, query) in zip(docs, prompts):
        alone = analyze(model, char_tokenizer(), context, query).to_dict()
        assert doc["logits"]["kl_patched"] < 1e-10 and max(x["mlp_branch_error"] for x in doc["layers"]) < 1e-9
        ids = lambda d: {k: [t["id"] for t in v] for k, v in d["logits"]["top_k"].items()}  # noqa: E731
        assert doc["logits"]["top1_match"] and ids(doc) == ids(alone)


def test_a_second_input_the_context_reaches_is_refused_naming_the_obstacle():
    # the residual stream carries the context to every block, and the theorem's update of z's readers leaves it
    model = model_with(lambda h: torch.tanh(h))
    with pytest.raises(ModelError) as e:
        analyze(model, char_tokenizer(), CONTEXT, QUERY)
    message = str(e.value)
    assert "block model.layers.0's MLP 'mlp' also reads `s`, which the context changes" in message
    assert "no update of z's readers can change" in message and "\n" not in message


def test_a_second_input_that_is_not_a_row_per_position_is_refused_as_a_limitation():
    model = model_with(lambda h: torch.ones(1, 1, 32, dtype=h.dtype))
    with pytest.raises(ModelError, match=r"also reads s of shape \(1, 1, 32\), not a row per position .* limitation"):
        decoder.blocks(model)


def test_inputs_are_cut_to_each_rows_last_real_position():
    z = torch.zeros(2, 4, 8)
    ids = torch.arange(8).reshape(2, 4)
    state = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    call = Call((z, ids), {"state": state, "flag": True}, None)
    cut = inputs_at_last(call, batch=2)
    assert cut.args[0].tolist() == [[3], [7]] and cut.kwargs["state"][:, 0].tolist() == state[:, -1].tolist()
    assert cut.kwargs["flag"] is True
    padded = inputs_at_last(call, batch=2, lasts=torch.tensor([1, 3]))
    assert padded.args[0].tolist() == [[1], [7]]
    flat = inputs_at_last(Call((z.reshape(8, 8), ids.reshape(8)), {}, None), batch=2)  # (B·T, d) MLP inputs
    assert flat.args[0].tolist() == [[3], [7]]


def test_inputs_compare_integers_exactly_and_floats_relatively():
    a = MlpInputs((torch.tensor([[3]]),), {"state": torch.tensor([[[1.0, 0.0]]])})
    same = MlpInputs((torch.tensor([[3]]),), {"state": torch.tensor([[[1.0, 1e-3]]])})
    assert same.difference(a) == (1, pytest.approx(1e-3, rel=1e-6))
    other = MlpInputs((torch.tensor([[4]]),), {"state": torch.tensor([[[1.0, 0.0]]])})
    assert other.difference(a) == (0, float("inf"))
    assert a.named() == [("argument 1", a.args[0]), ("state", a.kwargs["state"])]
