"""The batching runtime under mpirun: batched == alone == transformers, with chunked prefill,
preemption, prefix reuse and seeded sampling; every KV block free afterwards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import MPI_SCRIPTS, hf_reference, load_hf, mpirun, need_devices


def _run(n: int, spec: dict, tmp_path: Path) -> list[dict]:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    mpirun(n, [str(MPI_SCRIPTS / "run_batch.py"), str(tmp_path / "spec.json"),
               str(tmp_path / "out.json")])
    return json.loads((tmp_path / "out.json").read_text())


def _mixed_requests(count: int, seed: int, vocab: int = 300) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(vocab) for _ in range(rng.randint(3, 40))],
             "params": {"max_tokens": rng.randint(2, 20), "temperature": 0.0,
                        "ignore_eos": True}} for _ in range(count)]


@pytest.fixture(scope="module")
def mixed() -> list[dict]:
    return _mixed_requests(32, seed=5)


@pytest.fixture(scope="module")
def mixed_reference(hf_models: dict[str, Path], mixed: list[dict]) -> list[list[int]]:
    model = load_hf(hf_models["llama"])
    return [hf_reference(model, r["prompt"], r["params"]["max_tokens"])[1] for r in mixed]


@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_batch_equals_alone_and_transformers(tp: int, pp: int, hf_models: dict[str, Path],
                                             mixed: list[dict], mixed_reference: list,
                                             tmp_path: Path) -> None:
    need_devices(tp * pp)
    spec = {"llm": {"model": str(hf_models["llama"]), "tp_size": tp, "pp_size": pp,
                    "dtype": "float32", "block_size": 4, "num_kv_blocks": 40,
                    "max_num_tokens": 24, "max_model_len": 96, "max_batch_size": 16},
            "phases": [{"mode": "batch", "requests": mixed},
                       {"mode": "alone", "requests": mixed}], "check_tables": True}
    batch, alone = _run(tp * pp, spec, tmp_path)
    # every rank rebuilt the same block table from the plans' changes (issue 9, item 5)
    assert batch["tables_agree"]
    got = [o[0]["token_ids"] for o in batch["outputs"]]
    assert got == [o[0]["token_ids"] for o in alone["outputs"]]
    assert got == mixed_reference
    assert batch["preemptions"] > 0, "the pool was meant to be too small for the batch"
    assert all(o[0]["finish_reason"] == "length" for o in batch["outputs"])
    assert batch["num_free"] == batch["num_blocks"] and alone["num_free"] == alone["num_blocks"]
    assert all(t is not None and t > 0 for t in batch["ttft"])


@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_swap_preemption_equals_transformers(tp: int, pp: int, hf_models: dict[str, Path],
                                             mixed: list[dict], mixed_reference: list,
                                             tmp_path: Path) -> None:
    """The pool above with a host swap space: preempted sequences' KV goes to host memory
    and back (with overlap at pp 1, with two batches in flight at pp 2; pinned memory and
    CUDA graphs on a GPU); every rank's copies keep the tokens equal to transformers, and
    every block and slot is free afterwards."""
    need_devices(tp * pp)
    spec = {"llm": {"model": str(hf_models["llama"]), "tp_size": tp, "pp_size": pp,
                    "dtype": "float32", "block_size": 4, "num_kv_blocks": 40,
                    "max_num_tokens": 24, "max_model_len": 96, "max_batch_size": 16,
                    "swap_space": 0.01},
            "phases": [{"mode": "batch", "requests": mixed}], "check_tables": True}
    (batch,) = _run(tp * pp, spec, tmp_path)
    assert batch["tables_agree"]
    assert [o[0]["token_ids"] for o in batch["outputs"]] == mixed_reference
    assert batch["swap_slots"] == 40  # capped at the device pool
    assert batch["swapped"] > 0 and batch["swapped"] == batch["preemptions"]
    assert batch["num_free"] == batch["num_blocks"]
    assert batch["swap_free"] == batch["swap_slots"]


@pytest.mark.mpi
def test_guaranteed_no_evict_same_tokens_without_preemption(hf_models: dict[str, Path],
                                                           mixed: list[dict],
                                                           mixed_reference: list,
                                                           tmp_path: Path) -> None:
    """The same pool that forces preemptions above: guaranteed_no_evict admits fewer at once,
    preempts nothing, and produces the same tokens."""
    spec = {"llm": {"model": str(hf_models["llama"]), "dtype": "float32", "block_size": 4,
                    "num_kv_blocks": 40, "max_num_tokens": 24, "max_model_len": 96,
                    "max_batch_size": 16, "scheduler_policy": "guaranteed_no_evict"},
            "phases": [{"mode": "batch", "requests": mixed}]}
    (batch,) = _run(1, spec, tmp_path)
    assert [o[0]["token_ids"] for o in batch["outputs"]] == mixed_reference
    assert batch["preemptions"] == 0
    assert batch["num_free"] == batch["num_blocks"]


@pytest.mark.mpi
def test_prefix_reuse_counts_hits_and_changes_nothing(hf_models: dict[str, Path],
                                                      tmp_path: Path) -> None:
    need_devices(2)
    rng = random.Random(11)
    prefix = [rng.randrange(300) for _ in range(26)]
    reqs = [{"prompt": prefix + [rng.randrange(300) for _ in range(rng.randint(1, 6))],
             "params": {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}}
            for _ in range(8)]
    common = {"model": str(hf_models["mistral"]), "tp_size": 2, "dtype": "float32",
              "block_size": 4, "max_model_len": 64, "max_num_tokens": 64}
    first = {"mode": "alone", "requests": reqs[:1]}
    cached, = _run(2, {"llm": common, "phases": [first, {"mode": "batch", "requests": reqs}]},
                   tmp_path)[1:]
    plain, = _run(2, {"llm": {**common, "enable_prefix_caching": False},
                      "phases": [{"mode": "batch", "requests": reqs}]}, tmp_path)
    assert cached["prefix_hits"] >= 8 * 6  # 6 full blocks of the shared prefix, each request
    assert all(c >= 24 for c in cached["cached_tokens"])
    assert plain["prefix_hits"] == 0
    assert cached["outputs"] == plain["outputs"]
    assert cached["num_free"] == cached["num_blocks"]


@pytest.mark.mpi
def test_seeded_sampling_alone_equals_batched(hf_models: dict[str, Path],
                                              tmp_path: Path) -> None:
    need_devices(2)
    reqs = _mixed_requests(12, seed=9)
    for i, r in enumerate(reqs):
        r["params"] = {"max_tokens": 10, "temperature": 0.9, "top_k": 40, "top_p": 0.95,
                       "seed": 1000 + i, "ignore_eos": True, "logprobs": 2,
                       "presence_penalty": 0.3 if i % 2 else 0.0}
    spec = {"llm": {"model": str(hf_models["qwen2"]), "tp_size": 1, "pp_size": 2,
                    "dtype": "float32", "block_size": 8, "max_model_len": 64},
            "phases": [{"mode": "batch", "requests": reqs}, {"mode": "alone", "requests": reqs}]}
    batch, alone = _run(2, spec, tmp_path)
    tokens = [o[0]["token_ids"] for o in batch["outputs"]]
    assert tokens == [o[0]["token_ids"] for o in alone["outputs"]]
    assert len({tuple(t) for t in tokens}) > 1
    # sampled, not greedy: some tokens are not the most likely one
    assert any(tok != top[0][0] for o in batch["outputs"] for tok, _, top in o[0]["logprobs"])
    # logprobs agree up to fp32 rounding (a batch runs other GEMM shapes than one request)
    for b, a in zip(batch["outputs"], alone["outputs"]):
        for (tb, lb, topb), (ta, la, topa) in zip(b[0]["logprobs"], a[0]["logprobs"]):
            assert tb == ta and abs(lb - la) < 1e-4 and len(topb) == 2
            assert all(abs(x[1] - y[1]) < 1e-4 for x, y in zip(topb, topa))


@pytest.mark.mpi
@pytest.mark.parametrize("count,logprobs,max_batch", [(300, None, 256), (40, 20, 16)],
                         ids=["300-requests", "logprobs-20"])
def test_pipeline_results_over_the_eager_limit_do_not_deadlock(
        count: int, logprobs: int | None, max_batch: int, hf_models: dict[str, Path],
        tmp_path: Path) -> None:
    """A step result larger than MPI's eager limit (~4 KiB: 256 rows, or 13 with 20 logprobs)
    used to block the last stage in `Send` while the leader blocked in the next plan's
    broadcast, because the next batch was launched before the receive was posted."""
    need_devices(2)
    rng = random.Random(21)
    params = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    if logprobs is not None:
        params["logprobs"] = logprobs
    reqs = [{"prompt": [rng.randrange(300) for _ in range(8)], "params": params}
            for _ in range(count)]
    spec = {"llm": {"model": str(hf_models["llama"]), "tp_size": 1, "pp_size": 2,
                    "dtype": "float32", "block_size": 8, "max_model_len": 32,
                    "num_kv_blocks": 4 * count, "max_batch_size": max_batch},
            "phases": [{"mode": "batch", "requests": reqs},
                       {"mode": "alone", "requests": reqs}]}
    batch, alone = _run(2, spec, tmp_path)
    tokens = [o[0]["token_ids"] for o in batch["outputs"]]
    assert tokens == [o[0]["token_ids"] for o in alone["outputs"]]
    assert all(len(t) == 16 for t in tokens)
    if logprobs is not None:
        assert all(len(lp[2]) == logprobs for o in batch["outputs"] for lp in o[0]["logprobs"])
    assert batch["num_free"] == batch["num_blocks"]
