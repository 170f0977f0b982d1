"""The paper's model for in-context linear regression (Dherin et al. 2025, Section 4), and its training.

A prompt is (x₁, y₁, …, x_N, y_N, x_q) with x ~ N(0, I_d), y = ⟨w, x⟩, w ~ N(0, I_d) drawn afresh per
prompt. Each pair is one token [x; y] of width d + 1 and the query is [x_q; 0]; tokens are zero-padded to
`hidden_size` (the identity when it is d + 1). The prediction is coordinate d (the y slot) of the last
block's output at the query token, and the loss is the squared error.

Layout (no transformers class fits: their blocks always skip around the MLP), per block `layers.i`:

    a = attn(ln_1(x))           causal softmax self-attention (q, k, v, o), no positions
    z = x + a                   the skip around attention
    m = mlp(ln_2(z))            mlp.fc1 → ReLU → mlp.fc2; ΔW lives in mlp.fc1
    out = z + m if mlp_skip else m

ln_1 and ln_2 are LayerNorms with `pre_ln`, identities otherwise. The defaults are the paper's: one block,
one head, no LayerNorm, no skip around the MLP, d = 2, N = 50. The architecture table has its row
("icl_regression"), so the engine reads it as any other model. It keeps no KV cache.
"""

from __future__ import annotations

__all__ = ["ToyConfig", "prediction", "sample", "build", "train", "save", "is_toy", "load"]

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .errors import InputError, ModelError, UsageError
from .fileio import atomic_write_text
from .progress import Progress, Steps

MODEL_TYPE = "icl_regression"
WEIGHTS = "model.safetensors"
MAX_D, MAX_N = 64, 4096


@dataclass
class ToyConfig:
    """The model's settings; `hidden_size` None means d + 1. Saved as config.json with the training log."""

    d: int = 2
    n: int = 50  # context pairs per training prompt
    num_hidden_layers: int = 1
    num_attention_heads: int = 1
    hidden_size: int | None = None
    intermediate_size: int = 64
    pre_ln: bool = False
    mlp_skip: bool = False
    model_type: str = MODEL_TYPE
    use_cache: bool = False  # no KV cache: the engine runs each prefix's prompt whole
    name_or_path: str = "icl-regression"
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        self.hidden_size = self.hidden_size or self.d + 1
        check_config(self)


def check_config(c: ToyConfig) -> None:
    if not 1 <= c.d <= MAX_D:
        raise UsageError(f"d must be in 1..{MAX_D}, not {c.d}")
    if not 1 <= c.n <= MAX_N:
        raise UsageError(f"N (context pairs) must be in 1..{MAX_N}, not {c.n}")
    if c.num_hidden_layers < 1 or c.num_attention_heads < 1 or c.intermediate_size < 1:
        raise UsageError("`num_hidden_layers`, `num_attention_heads` and `intermediate_size` must be ≥ 1")
    if c.hidden_size < c.d + 1:
        raise UsageError(f"`hidden_size` must be ≥ d + 1 = {c.d + 1} (a token [x; y] must fit), not {c.hidden_size}")
    if c.hidden_size % c.num_attention_heads:
        h, heads = c.hidden_size, c.num_attention_heads
        raise UsageError(f"`hidden_size={h}` must be divisible by `num_attention_heads={heads}`")


class ToyAttention(nn.Module):
    """Causal multi-head softmax self-attention without positions; returns the branch (B, T, hidden)."""

    def __init__(self, c: ToyConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(c.hidden_size, c.hidden_size) for _ in "qkvo")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, C / heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class ToyMLP(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(z)))


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(c.hidden_size)) if c.pre_ln else nn.Identity
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(), ToyAttention(c), norm(), ToyMLP(c)
        self.mlp_skip = c.mlp_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x + self.attn(self.ln_1(x))
        m = self.mlp(self.ln_2(z))
        return z + m if self.mlp_skip else m


class ToyRegression(nn.Module):
    """The stack of blocks; `forward(inputs_embeds=(B, T, d + 1))` returns `.logits`, the last block's output."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ToyBlock(config) for _ in range(config.num_hidden_layers))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_input_embeddings(self):
        return None  # the prompt is its own input vectors

    def forward(self, inputs_embeds=None, input_ids=None, logits_to_keep: int = 0, **_ignored) -> SimpleNamespace:
        """`_ignored`: use_cache and the like, which a model without a cache or positions has no use for."""
        if input_ids is not None or inputs_embeds is None:
            raise InputError("the regression model reads input vectors, not token ids; give the prompt as Vectors")
        width = self.config.d + 1
        if inputs_embeds.shape[-1] != width:
            raise InputError(f"tokens must have width d + 1 = {width} ([x; y]), not {inputs_embeds.shape[-1]}")
        h = nn.functional.pad(inputs_embeds.to(self.dtype), (0, self.config.hidden_size - width))
        for block in self.layers:
            h = block(h)
        return SimpleNamespace(logits=h[:, -logits_to_keep:] if logits_to_keep else h)


def prediction(logits: torch.Tensor, d: int) -> torch.Tensor:
    """ŷ: coordinate d (the y slot) of the model's output, for logits of shape (..., hidden)."""
    return logits[..., d]


# ---- data --------------------------------------------------------------------------------------------------


def sample(gen: torch.Generator, batch: int, n: int, d: int, dtype=torch.float32):
    """`batch` prompts: tokens (B, n + 1, d + 1) with the query [x_q; 0] last, w (B, d), y_q (B,)."""
    w = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, n + 1, d, generator=gen, dtype=torch.float64)
    y = torch.einsum("btd,bd->bt", x, w)  # (B, n + 1)
    tokens = torch.cat([x, y[..., None]], -1)
    tokens[:, -1, d] = 0.0
    return tokens.to(dtype), w.to(dtype), y[:, -1].to(dtype)


# ---- training ----------------------------------------------------------------------------------------------


def build(config: ToyConfig, seed: int) -> ToyRegression:
    torch.manual_seed(seed)
    return ToyRegression(config)


def train(config: ToyConfig, steps: int, seed: int = 0, batch: int = 64, lr: float = 1e-3, checkpoints: int = 10,
          progress: Progress | None = None):  # fmt: skip
    """Adam on fresh prompts each step, seeded and deterministic on one thread; each step reported to `progress`.

    Returns (model, log, states): the log has per checkpoint its step and mean training loss since the last
    one; states are the weights at each checkpoint step (the first is step 0, before training).
    """
    if steps < 1 or batch < 1 or checkpoints < 1 or not lr > 0:
        raise UsageError(f"`steps`, `batch` and `checkpoints` must be ≥ 1 and `lr` > 0, not {steps}, {batch}, "
                         f"{checkpoints} and {lr}")  # fmt: skip
    torch.set_num_threads(1)
    model = build(config, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    marks = sorted({round(steps * k / checkpoints) for k in range(1, checkpoints + 1)})
    log, states, window, started = [], [snapshot(model)], [], time.perf_counter()
    log.append({"step": 0, "train_loss": None})
    for step in Steps(progress, "training steps", steps).each(range(1, steps + 1)):
        tokens, _, y = sample(gen, batch, config.n, config.d)
        loss = (prediction(model(inputs_embeds=tokens, logits_to_keep=1).logits[:, -1], config.d) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if step in marks:
            log.append({"step": step, "train_loss": sum(window) / len(window)})
            states.append(snapshot(model))
            window = []
    seconds = time.perf_counter() - started
    config.training = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "seconds": seconds, "log": log}
    return model.eval(), states


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ---- files -------------------------------------------------------------------------------------------------


def save(model: ToyRegression, states: list[dict], folder: str | Path) -> Path:
    """config.json (with the training log), model.safetensors, and checkpoints/step-K.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    for entry, state in zip(model.config.training["log"], states):
        tmp = folder / "checkpoints" / f".step-{entry['step']}.tmp"
        save_file(state, str(tmp), metadata={"step": str(entry["step"])})
        tmp.rename(folder / "checkpoints" / f"step-{entry['step']}.safetensors")
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(snapshot(model), str(tmp))
    tmp.rename(folder / WEIGHTS)
    atomic_write_text(folder / "config.json", json.dumps(asdict(model.config), indent=2) + "\n")
    return folder


def is_toy(folder: str | Path) -> bool:
    """Whether `folder` holds a model `save` wrote (its config.json names model_type icl_regression)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load(folder: str | Path, dtype: torch.dtype = torch.float32, checkpoint: int | None = None) -> ToyRegression:
    """The model in `folder` (or its weights at training step `checkpoint`), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        fields = json.loads((folder / "config.json").read_text())
        config = ToyConfig(**{k: v for k, v in fields.items() if k in ToyConfig.__dataclass_fields__})
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"cannot read {folder / 'config.json'}: {e}; train one with icl-probe regression train") from e
    name = WEIGHTS if checkpoint is None else f"checkpoints/step-{checkpoint}.safetensors"
    if not (folder / name).is_file():
        raise ModelError(f"no {name} in {folder}; train the model with icl-probe regression train -o {folder}")
    model = ToyRegression(config)
    state = load_file(str(folder / name))
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise ModelError(f"the weights in {folder / name} do not match its config.json; retrain the model")
    model.load_state_dict(state)
    model.icl_probe_name = str(folder)
    return model.to(dtype).eval()


def checkpoint_steps(model: ToyRegression) -> list[int]:
    return [e["step"] for e in model.config.training.get("log", [])]
