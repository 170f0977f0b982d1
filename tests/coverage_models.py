"""The coverage table's tiny float64 models, built and analysed once per test session, for the test files that
check families one by one (test_moe.py, test_unusual_blocks.py)."""

import functools

import pytest
import torch

from icl_probe import analyze, coverage


@pytest.fixture(autouse=True)
def float64_default():
    """As the coverage table runs them: some families build masks and rotary tables in the default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@functools.cache
def model_of(name: str):
    return coverage.tiny_model(name)


@functools.cache
def analysis_of(name: str):
    return analyze(model_of(name), coverage.char_tokenizer(), coverage.CONTEXT, coverage.QUERY)
