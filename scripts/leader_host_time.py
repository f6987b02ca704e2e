"""The leader's host time per step on CPU, by phase, with the model's forward left out.

A profiling aid, not a benchmark of the model: the stage forward is replaced by zero logits
(so a CPU run measures what a GPU leader spends in Python while the GPU computes), the
sampler still runs. Prints ms per step of the whole `LLMEngine.step`, of the CPU figure
`leader_host_ms_per_step_excl_cpu_compute`, and of each leader phase (schedule, _plan,
_process, inputs fill, plan encode).

    OMP_NUM_THREADS=1 python scripts/leader_host_time.py --batch 1024 [--no-tokenizer]

`--no-tokenizer` drops the detokenizer, like `trtdist bench --dummy-weights llama3-8b`
(a preset has no tokenizer). On a shared machine take the minimum of a few runs.
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from trtdist import DistributedLLM, SamplingParams
from trtdist.runtime import engine as engine_mod
from trtdist.runtime import inputs as inputs_mod
from trtdist.runtime import model_runner
from trtdist.runtime import plan as plan_mod
from trtdist.runtime import scheduler as scheduler_mod


def _zero_logits(model: Any, kv: Any, x: torch.Tensor, views: Any, meta: Any,
                 all_logits: bool, hidden_out: Any = None) -> torch.Tensor:
    rows = x.shape[0] if all_logits or views.logits_rows is None else views.logits_rows.numel()
    return torch.zeros(rows, model.cfg.vocab_size)


def _timed(totals: collections.Counter[str], label: str, fn: Callable[..., Any]
           ) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1024, help="max batch size = requests")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-tokenizer", action="store_true")
    args = ap.parse_args()
    model_runner.run_stage = _zero_logits  # type: ignore[assignment]
    totals: collections.Counter[str] = collections.Counter()
    for cls, name, label in ((scheduler_mod.Scheduler, "schedule", "schedule"),
                             (engine_mod.LLMEngine, "_plan", "plan"),
                             (engine_mod.LLMEngine, "_process", "process"),
                             (inputs_mod.StepInputs, "fill", "fill"),
                             (plan_mod.StepPlan, "encode", "encode")):
        setattr(cls, name, _timed(totals, label, getattr(cls, name)))
    llm = DistributedLLM("tiny", device="cpu", max_batch_size=args.batch,
                         max_num_tokens=16384, max_model_len=args.input_len + args.output_len)
    engine = llm.engine
    assert engine is not None
    if args.no_tokenizer:
        engine.tokenizer = None
    rng = random.Random(0)
    vocab = engine.model_cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], params)
    engine.allocator.reset_prefix_cache()
    totals.clear()
    timer = llm._runner.timer
    timer.enabled = True
    timer.reset()
    steps = engine.stats["steps"]
    llm.generate(prompts, params)
    steps = engine.stats["steps"] - steps
    summary = timer.summary()
    phases = ", ".join(f"{k} {1e3 * v / steps:.2f}" for k, v in totals.most_common())
    print(f"batch {args.batch}, {steps} steps, tokenizer {not args.no_tokenizer}: host "
          f"{summary['leader_host_ms_per_step']:.2f} ms/step, without CPU compute "
          f"{summary['leader_host_ms_per_step_excl_cpu_compute']:.2f}; {phases}")
    llm.shutdown()


if __name__ == "__main__":
    main()
