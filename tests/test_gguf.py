"""GGUF checkpoints: SmolLM2-135M-Instruct (Q4_1) read by trtdist equals transformers' reading
of the same file, under TP and PP, and answers a chat question sensibly over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import need_devices
from server_helpers import start_server

from trtdist import DistributedLLM, SamplingParams
from trtdist.engine.build import build_engine
from trtdist.engine.gguf_source import GGUFCheckpoint, gguf_tokenizer_dir
from trtdist.engine.source import resolve_model
from trtdist.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def reference(smollm2_hf, smollm2_gguf: Path) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """transformers' greedy continuations of PROMPTS."""
    tok = Tokenizer(gguf_tokenizer_dir(smollm2_gguf))
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok.encode(p)
            gen = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=2)
            out.append(gen[0, len(ids):].tolist())
    return out


def test_weights_config_and_tokenizer_match_transformers(smollm2_hf,  # type: ignore[no-untyped-def]
                                                         smollm2_gguf: Path) -> None:
    ckpt = GGUFCheckpoint(smollm2_gguf)
    cfg = ckpt.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in ckpt
    state = smollm2_hf.state_dict()
    names = [n for n in state if n != "lm_head.weight"]
    assert sorted(names) == sorted(ckpt._tensors)
    for name in names:  # Q/K un-permuted, every tensor dequantized exactly as transformers does
        assert torch.equal(ckpt.get(name), state[name].float()), name
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = Tokenizer(gguf_tokenizer_dir(smollm2_gguf))
    for text in ["Hello, world! 2024 ça va?\n\n  x", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.eos_token_ids == (2,) and "<|im_start|>" in (tok.chat_template or "")


@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp,engine", [(1, 1, False), (1, 2, False), (3, 1, True)])
def test_greedy_equals_transformers(tp: int, pp: int, engine: bool, smollm2_gguf: Path,
                                    reference: list[list[int]], tmp_path: Path) -> None:
    need_devices(tp * pp)
    model: Path = smollm2_gguf
    if engine:  # `trtdist build FILE.gguf` as well as the file itself
        model = build_engine(smollm2_gguf, tmp_path / "engine", tp_size=tp, pp_size=pp,
                             dtype="float32", progress=False)
        assert resolve_model(model).kind == "engine" and (model / "tokenizer.json").exists()
    else:
        assert resolve_model(model).kind == "gguf"
    with DistributedLLM(model, tp_size=tp, pp_size=pp, dtype="float32", max_model_len=128,
                        num_kv_blocks=32) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                    ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == reference
    assert "Paris" in outs[0].outputs[0].text


def test_default_model_is_smollm2(smollm2_gguf: Path) -> None:
    src = resolve_model(None)
    assert src.kind == "gguf" and src.path == smollm2_gguf
    assert resolve_model("tiny").kind == "hf"


@pytest.mark.mpi
def test_chat_answers_capital_of_france() -> None:
    from openai import OpenAI

    # the README's first command: no model named, two ranks, PP=2 (9 heads: TP 1 or 3)
    server = start_server(2, ["--pp-size", "2", "--max-model-len", "512", "--max-batch-size",
                              "8"], model=None)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        r = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=24, temperature=0.0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    finally:
        server.stop()
