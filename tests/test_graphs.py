"""CUDA-graph decode (runtime/graph_runner.py): replay equals eager execution, and greedy
tokens are the same with and without --enforce-eager, in one process and under mpirun."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MPI_SCRIPTS, mpirun, need_devices, relative_error

from trtdist import DistributedLLM, SamplingParams
from trtdist.runtime.graph_runner import run_stage
from trtdist.runtime.plan import FORWARD, StepPlan
from trtdist.runtime.rank import RankOptions

BUCKETS = (1, 2, 4, 8)


def _requests(count: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [([rng.randrange(300) for _ in range(rng.randint(3, 30))],
             SamplingParams(max_tokens=rng.randint(4, 24), temperature=0.0, ignore_eos=True))
            for _ in range(count)]


def _decode_plan(rng: np.random.Generator, s: int, bs: int, num_blocks: int) -> StepPlan:
    ctx = rng.integers(1, 60, s)
    nb = -(-ctx // bs)
    blocks = rng.permutation(np.arange(1, num_blocks + 1))[:int(nb.sum())]  # disjoint tables
    tables = np.zeros((s, int(nb.max())), np.int64)
    o = 0
    for i, n in enumerate(nb.tolist()):
        tables[i, :n] = blocks[o:o + n]
        o += n
    return StepPlan(FORWARD, rng.integers(0, 300, s), ctx - 1, np.ones(s, np.int64), ctx, tables)


def test_graph_options_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    from trtdist.cli import build_parser

    args = build_parser().parse_args(["bench", "--enforce-eager", "--cuda-graph-batch-sizes",
                                      "1,2,4", "--attention-backend", "torch"])
    assert (args.enforce_eager, args.cuda_graph_batch_sizes, args.attention_backend) == (
        True, (1, 2, 4), "torch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cuda-graph-batch-sizes", "1,two"])
    assert "comma-separated positive batch sizes" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"in \[1, max_batch_size 8\]"):
        RankOptions(max_batch_size=8, cuda_graph_batch_sizes=(1, 16))
    with pytest.raises(ValueError, match="attention_backend must be auto, torch or triton"):
        RankOptions(attention_backend="flash")
    assert RankOptions(cuda_graph_batch_sizes=[4, 1]).cuda_graph_batch_sizes == (4, 1)


def test_cpu_runs_eagerly_without_graphs(hf_models: dict[str, Path]) -> None:
    with DistributedLLM(hf_models["llama"], dtype="float32", device="cpu", block_size=4,
                        max_model_len=64, max_batch_size=4, max_num_tokens=32,
                        num_kv_blocks=40) as llm:
        assert llm._runner.graphs is None and llm._runner.model.attention_backend.name == "torch"
        outs = llm.generate([p for p, _ in _requests(6, seed=3)],
                            [sp for _, sp in _requests(6, seed=3)])
        assert all(len(o.outputs[0].token_ids) == sp.max_tokens
                   for o, (_, sp) in zip(outs, _requests(6, seed=3)))


def test_padded_bucket_inputs_leave_real_rows_unchanged(hf_models: dict[str, Path]) -> None:
    """What a graph replay sees (a bucket padded with null-block rows), run through the
    torch backend on CPU: the real rows' logits equal an unpadded step's, nothing is written
    to the null block."""
    with DistributedLLM(hf_models["llama"], dtype="float32", device="cpu", block_size=4,
                        max_model_len=128, max_batch_size=8, num_kv_blocks=160) as llm:
        runner = llm._runner
        runner.kv.data[:, :, 1:].normal_()
        rng = np.random.default_rng(1)
        for s, bucket in ((1, 2), (3, 4), (5, 8)):
            plan = _decode_plan(rng, s, 4, runner.kv.num_blocks)
            with torch.inference_mode():
                plain = runner._forward(plan).clone()
                views = runner.inputs.fill(plan, pad_to=bucket)
                meta = runner.model.attention_backend.prepare(views.attention)
                padded = run_stage(runner.model, runner.kv.layers, views.input_ids, views, meta,
                                   all_logits=True)
            assert padded.shape[0] == bucket
            # NOTE: a GEMM over more rows may block the sums differently (fp32, ~1e-5): the
            # padding must not change the real rows beyond that
            torch.testing.assert_close(padded[:s], plain, rtol=1e-4, atol=1e-4)
            assert not bool(runner.kv.data[:, :, 0].any()), "the null block was written"


@pytest.mark.gpu
def test_graph_replay_equals_eager_for_every_bucket(hf_models: dict[str, Path]) -> None:
    with DistributedLLM(hf_models["llama"], dtype="float32", device="cuda", block_size=4,
                        max_model_len=128, max_batch_size=8, num_kv_blocks=160,
                        cuda_graph_batch_sizes=BUCKETS) as llm:
        runner = llm._runner
        graphs = runner.graphs
        assert graphs is not None and sorted(graphs.graphs) == list(BUCKETS)
        # one static output for every bucket (each keeping its own logits exhausted memory
        # at --max-batch-size 1024)
        shared = graphs.static_output
        assert shared is not None and shared.shape == (BUCKETS[-1], llm.engine.model_cfg.vocab_size)
        assert all(o.data_ptr() == shared.data_ptr() and o.shape[0] == b
                   for b, o in graphs.outputs.items())
        runner.kv.data[:, :, 1:].normal_()  # a random cache behind the sequences
        rng = np.random.default_rng(0)
        for s in range(1, 9):
            plan = _decode_plan(rng, s, 4, runner.kv.num_blocks)
            assert graphs.bucket_for(plan) == next(b for b in BUCKETS if b >= s)
            with torch.inference_mode():
                replayed = runner._forward(plan).clone()
                runner.graphs = None
                eager = runner._forward(plan).clone()
                runner.graphs = graphs
            assert replayed.shape == eager.shape == (s, llm.engine.model_cfg.vocab_size)
            err = relative_error(replayed.cpu().double(), eager.cpu().double())
            assert err <= 1e-4, f"batch {s}: graph logits differ from eager by {err:.2e}"
            assert torch.equal(replayed.argmax(-1), eager.argmax(-1))
            assert not bool(runner.kv.data[:, :, 0].any()), "the null block was written"


@pytest.mark.gpu
def test_greedy_tokens_equal_with_and_without_enforce_eager(hf_models: dict[str, Path]) -> None:
    reqs = _requests(12, seed=1)
    tokens = []
    for eager in (True, False):
        with DistributedLLM(hf_models["llama"], dtype="float32", device="cuda", block_size=4,
                            max_model_len=128, max_batch_size=8, max_num_tokens=64,
                            enforce_eager=eager) as llm:
            assert (llm._runner.graphs is None) == eager
            outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
            tokens.append([o.outputs[0].token_ids for o in outs])
    assert tokens[0] == tokens[1]


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_graphs_under_mpirun_match_eager(tp: int, pp: int, hf_models: dict[str, Path],
                                         tmp_path: Path) -> None:
    need_devices(tp * pp)
    requests = [{"prompt": p, "params": {"max_tokens": sp.max_tokens, "temperature": 0.0,
                                         "ignore_eos": True}} for p, sp in _requests(12, 2)]
    results = []
    for eager in (True, False):
        spec = {"llm": {"model": str(hf_models["llama"]), "tp_size": tp, "pp_size": pp,
                        "dtype": "float32", "block_size": 4, "max_model_len": 96,
                        "max_num_tokens": 48, "max_batch_size": 8, "enforce_eager": eager},
                "phases": [{"mode": "batch", "requests": requests}]}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        mpirun(tp * pp, [str(MPI_SCRIPTS / "run_batch.py"), str(tmp_path / "spec.json"),
                         str(tmp_path / "out.json")])
        (phase,) = json.loads((tmp_path / "out.json").read_text())
        results.append([o[0]["token_ids"] for o in phase["outputs"]])
        assert phase["num_free"] == phase["num_blocks"]
    assert results[0] == results[1]
