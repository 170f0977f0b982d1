import os

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails loudly
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("COLUMNS", None)  # piped CLI output is 160 wide unless a test sets COLUMNS itself

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import char_tokenizer, save_tiny, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(bos=False)


@pytest.fixture(scope="session")
def bos_tokenizer():
    return char_tokenizer(bos=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A tiny llama saved in save_pretrained layout, for the CLI."""
    return save_tiny(tiny_model("llama", torch.float32), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def real_models():
    """The real SmolLM2-135M and Gemma 3 270M, each loaded once per session on first use."""
    from icl_probe.models import load_model  # bound now: a test may stand in for the CLI's load_model later

    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_model(name)
        return loaded[name]

    return get


def pytest_addoption(parser):
    parser.addoption("--figures", action="store_true", help="also run the `figures` tests (./run test-figures)")


def pytest_collection_modifyitems(config, items):
    """Every test that loads a real model is `slow`: `./run test-quick` (pytest -m "not slow") leaves them out.

    The `figures` tests re-run the docs' slow commands (tens of minutes): skipped unless --figures is given.
    """
    skip = pytest.mark.skip(reason="re-runs the docs' slow commands: ./run test-figures (pytest --figures)")
    for item in items:
        if "real_models" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("figures"):
            item.add_marker(pytest.mark.slow)
            if not config.getoption("--figures"):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def runner(real_models, tmp_path_factory):
    """Runs the commands the docs print through the real CLI, with the session's real models (doc_commands.py)."""
    from doc_commands import Runner

    return Runner(real_models, tmp_path_factory.mktemp("doc-commands"))
