"""Engine build and load: per-rank shards, and clear errors for bad files or worlds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import MPI_SCRIPTS, TINY_CONFIGS, mpirun, trtdist_cli
from safetensors import safe_open

from trtdist.config import ModelConfig
from trtdist.engine.build import build_engine
from trtdist.engine.source import resolve_model


def _expected_elements(kind: str, tp: int, pp_rank: int, pp: int, layers: range) -> int:
    """Elements one rank must hold, from the architecture alone (independent of the code)."""
    c = TINY_CONFIGS[kind]
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim", h // heads)
    kv_local = max(kv // tp, 1)
    v_local = -(-v // tp)
    per_layer = 2 * h + (heads // tp + 2 * kv_local) * hd * h + h * (heads // tp) * hd
    per_layer += 3 * h * inter // tp
    if kind == "qwen2":
        per_layer += (heads // tp + 2 * kv_local) * hd
    n = per_layer * len(layers)
    if pp_rank == 0:
        n += v_local * h
    if pp_rank == pp - 1:
        n += h + v_local * h
    return n


@pytest.mark.parametrize("kind,tp,pp", [("llama", 2, 1), ("qwen2", 4, 1), ("mistral", 2, 2)])
def test_rank_files_hold_only_their_shard(kind: str, tp: int, pp: int,
                                          hf_models: dict[str, Path], tmp_path: Path) -> None:
    eng = build_engine(hf_models[kind], tmp_path / "e", tp, pp, "float32", progress=False)
    meta = json.loads((eng / "config.json").read_text())
    layers = meta["mapping"]["pp_partition"]
    starts = [sum(layers[:i]) for i in range(pp)]
    full = sum(f.stat().st_size for f in hf_models[kind].glob("*.safetensors"))
    for rank in range(tp * pp):
        path = eng / f"rank{rank}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            elements = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
        pr = rank // tp
        want = _expected_elements(kind, tp, pr, pp, range(starts[pr], starts[pr] + layers[pr]))
        assert elements == want, f"rank {rank}: {elements} elements, expected {want}"
        size = path.stat().st_size
        assert want * 4 <= size < want * 4 + 16384  # data plus a small header
        assert size < 0.75 * full, f"rank {rank} file is {size} bytes of {full} for the model"
        assert meta["files"][path.name]["bytes"] == size


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_dummy_weights_preset_shapes() -> None:
    src = resolve_model("llama3-70b", dummy_weights=True)
    assert src.kind == "dummy"
    assert (src.config.num_layers, src.config.num_heads, src.config.num_kv_heads) == (80, 64, 8)
    with pytest.raises(FileNotFoundError, match="or a preset: llama3-8b, llama3-70b"):
        resolve_model("llama3-9b", dummy_weights=True)


@pytest.mark.mpi
def test_dummy_weights_run(hf_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.npz"
    mpirun(2, [str(MPI_SCRIPTS / "run_model.py"), str(out), "2", "1", "auto", "1,2,3", "4",
               "--dummy", str(hf_models["llama"] / "config.json")])
    import numpy as np

    res = np.load(out)
    assert res["logits0"].shape == (3, 301) and np.isfinite(res["logits0"]).all()


def test_config_parsing_and_validation(hf_models: dict[str, Path]) -> None:
    llama = ModelConfig.from_file(hf_models["llama"] / "config.json")
    assert llama.rope_scaling and llama.rope_scaling["rope_type"] == "llama3"
    assert llama.rope_theta == 500000.0
    qwen = ModelConfig.from_file(hf_models["qwen2"] / "config.json")
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    mistral = ModelConfig.from_file(hf_models["mistral"] / "config.json")
    assert mistral.sliding_windows == (12,) * 4
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="lacks required field 'hidden_size'"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ModelConfig.from_hf({**TINY_CONFIGS["qwen2"], "model_type": "llama",
                             "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_build_rejects_bad_parallelism(hf_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 tensor-parallel ranks cannot split 4 attention"):
        build_engine(hf_models["llama"], tmp_path / "e", 3, 1, progress=False)
    with pytest.raises(ValueError, match="pp_size 5 exceeds the model's 3 layers"):
        build_engine(hf_models["llama"], tmp_path / "e", 1, 5, progress=False)


def test_build_rejects_incomplete_checkpoint(hf_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(hf_models["llama"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        build_engine(bad, tmp_path / "e", 1, 1, progress=False)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        build_engine(bad, tmp_path / "e", 1, 1, progress=False)


def test_unknown_model_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(tmp_path / "empty")


@pytest.mark.mpi
def test_corrupt_missing_and_mismatched_engines(hf_models: dict[str, Path],
                                                tmp_path: Path) -> None:
    eng = build_engine(hf_models["llama"], tmp_path / "e", 2, 1, "float32", progress=False)
    script = [str(MPI_SCRIPTS / "run_model.py"), str(tmp_path / "o.npz"), "2", "1", "auto",
              "1,2,3", "2", str(eng)]
    # wrong world size: the engine is for 2 ranks
    proc = mpirun(1, [*script[:2], "1", "1", *script[4:]], check=False)
    assert proc.returncode != 0
    assert "built for tp_size=2 pp_size=1 (2 ranks)" in proc.stderr
    # a flipped byte in rank 1's file
    f1 = eng / "rank1.safetensors"
    data = bytearray(f1.read_bytes())
    data[-10] ^= 0xFF
    f1.write_bytes(bytes(data))
    proc = mpirun(2, script, check=False)
    assert proc.returncode != 0
    assert "rank 1: " in proc.stderr and "sha256 checksum" in proc.stderr
    # truncated, then missing
    f1.write_bytes(bytes(data[:-100]))
    proc = mpirun(2, script, check=False)
    assert proc.returncode != 0 and "truncated or replaced" in proc.stderr
    f1.unlink()
    proc = mpirun(2, script, check=False)
    assert proc.returncode != 0 and "rank1.safetensors is missing" in proc.stderr


@pytest.mark.mpi
def test_cli_build_info_and_generate(hf_models: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from trtdist.cli import main

    eng = tmp_path / "engine"
    assert main(["build", str(hf_models["qwen2"]), "-o", str(eng), "--tp-size", "2",
                 "--dtype", "float32"]) == 0
    assert (eng / "rank0.safetensors").exists() and (eng / "rank1.safetensors").exists()
    capsys.readouterr()
    assert main(["info", str(eng)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "engine" and info["model"]["model_type"] == "qwen2"
    assert info["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1,
                               "pp_partition": [info["model"]["num_layers"]]}
    assert info["build"]["dtype"] == "float32" and sorted(info["files"]) == [
        "rank0.safetensors", "rank1.safetensors"]
    # the built-in tiny model (with its tokenizer) under 1 and 2 ranks, TP and PP: same text
    single = trtdist_cli(1, ["generate", "tiny", "--prompt", "Hello world", "--max-tokens", "8",
                             "--ignore-eos"])
    assert single.stdout.strip(), single.stderr
    for flags in (["--tp-size", "2"], ["--pp-size", "2"]):
        proc = trtdist_cli(2, ["generate", "tiny", "--prompt", "Hello world", "--max-tokens",
                               "8", "--ignore-eos", *flags])
        assert proc.stdout == single.stdout, (flags, proc.stderr)


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from trtdist.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--max-tokens", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "x", "-o", "y", "--dtype", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.mpi
def test_cli_bench_prints_json(tmp_path: Path) -> None:
    proc = trtdist_cli(2, ["bench", "tiny", "--pp-size", "2", "--num-requests", "6",
                           "--input-len", "8", "--output-len", "5",
                           "--output", str(tmp_path / "b.json")])
    result = json.loads((tmp_path / "b.json").read_text())
    assert json.loads(proc.stdout) == result
    assert (result["tp_size"], result["pp_size"], result["num_requests"]) == (1, 2, 6)
    assert result["output_tokens_per_s"] > 0 and result["ttft_s"]["p50"] > 0
