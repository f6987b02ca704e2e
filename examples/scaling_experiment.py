"""Loop over (tp, pp) settings from one plain `python` process and print a table.

    python examples/scaling_experiment.py                       # built-in tiny model, CPU
    python examples/scaling_experiment.py --model llama3-8b --dummy-weights \\
        --settings 1x1,2x1,4x1,2x2 --requests 256 --max-tokens 128   # on a GPU node

Each setting spawns its own world of tp*pp ranks (this process is rank 0) and shuts it down
before the next one starts.
"""

from __future__ import annotations

import argparse
import random
import time

from trtdist import DistributedLLM, SamplingParams


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            tp, pp = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--settings wants TPxPP items such as 2x1, got {item!r}") from None
        out.append((tp, pp))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--dummy-weights", action="store_true")
    p.add_argument("--settings", default="1x1,2x1,1x2,2x2", type=parse_settings)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    rows = []
    for tp, pp in args.settings:
        with DistributedLLM(args.model, tp_size=tp, pp_size=pp, dtype=args.dtype,
                            dummy_weights=args.dummy_weights) as llm:
            vocab = llm.engine.model_cfg.vocab_size
            rng = random.Random(0)  # the same prompts for every setting
            prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)]
                       for _ in range(args.requests)]
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                    ignore_eos=True)
            llm.generate(prompts[:1], params)  # warm-up
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            ttft = sorted(o.metrics.ttft for o in outs)[len(outs) // 2]
            first = outs[0].outputs[0].token_ids[:4]
            rows.append((tp, pp, tokens / elapsed, ttft * 1e3, first))
    print(f"{'tp':>3} {'pp':>3} {'tok/s':>10} {'p50 TTFT ms':>12}  first tokens")
    for tp, pp, tps, ttft, first in rows:
        print(f"{tp:>3} {pp:>3} {tps:>10.1f} {ttft:>12.1f}  {first}")


if __name__ == "__main__":
    main()
