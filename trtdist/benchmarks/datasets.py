"""Prompts for the serving benchmark: synthetic token-id prompts or a JSONL file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One prompt and how many tokens to ask for (`ignore_eos` makes that the output length)."""

    prompt: str | list[int]
    output_len: int

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a benchmark prompt must not be empty")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")


def sample_len(rng: random.Random, mean: int, ratio: float) -> int:
    """A length uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    low, high = max(1, int(mean * (1.0 - ratio))), max(1, int(mean * (1.0 + ratio)))
    return rng.randint(low, high)


def synthetic_requests(num: int, input_len: int, output_len: int, *, range_ratio: float = 0.0,
                       vocab_size: int = 256, seed: int = 0) -> list[BenchRequest]:
    """`num` prompts of random token ids in [0, vocab_size).

    With `range_ratio` r > 0 the input and output lengths are drawn uniformly from
    [len * (1 - r), len * (1 + r)] (vLLM's `--random-range-ratio`). Prompts are token ids, so
    their length is exact whatever the tokenizer; random ids share no prefix, so the server's
    prefix cache does not flatter the numbers.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if vocab_size < 1:
        raise ValueError(f"--vocab-size must be >= 1, got {vocab_size}")
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = sample_len(rng, input_len, range_ratio)
        out.append(BenchRequest([rng.randrange(vocab_size) for _ in range(n)],
                                sample_len(rng, output_len, range_ratio)))
    return out


def jsonl_requests(path: str | Path, num: int | None, output_len: int) -> list[BenchRequest]:
    """Prompts from a JSONL file, one object a line: `{"prompt": "text" or [ids]}`, optionally
    with `"output_len"` (or `"max_tokens"`); others get `output_len`. The first `num` lines are
    used (all when None); fewer lines than `num` are cycled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {path}: no such file")
    rows: list[BenchRequest] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"--dataset {path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ValueError(f'{where}: expected an object with "prompt", got {line[:80]!r}')
        prompt = obj["prompt"]
        ok_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        if not (isinstance(prompt, str) or ok_ids) or not prompt:
            raise ValueError(f"{where}: prompt must be a non-empty string or list of token ids")
        n = obj.get("output_len", obj.get("max_tokens", output_len))
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: output_len must be a positive integer, got {n!r}")
        rows.append(BenchRequest(prompt, n))
    if not rows:
        raise ValueError(f"--dataset {path}: no prompts in the file")
    if num is None:
        return rows
    return [rows[i % len(rows)] for i in range(num)]
