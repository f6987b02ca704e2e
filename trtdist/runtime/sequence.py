"""A sequence: one completion of a request (a request with n > 1 has n sequences)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from trtdist.outputs import RequestMetrics, TokenLogprob
from trtdist.runtime.detokenize import IncrementalDetokenizer
from trtdist.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt, then generated tokens
    prompt_len: int
    params: SamplingParams
    metrics: RequestMetrics
    parent: Sequence | None = None  # sibling 0 of an n > 1 request shares its prompt blocks
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt: int = 0  # prompt tokens reused from the prefix cache (last admission)
    in_flight: int = 0  # batches still in the pipeline that hold this sequence
    # Tokens sampled on the device but not yet seen by the leader (overlap scheduling): the
    # next decode input names "the token this sequence sampled in the last step" instead.
    num_pending: int = 0
    sample_row: int = -1  # its row among the sampled rows of the last batch it sampled in
    row: int = -1  # its row of the persistent block table while running (block_table.py)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # the prompt's token logprobs, by position (None for the first), when asked for
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    num_preemptions: int = 0
    # Slots of the host swap space holding its KV (blocks 0.. of its table, `num_computed`
    # tokens) while it waits, swapped out; None when its KV is on the device or is gone.
    host_blocks: list[int] | None = None
    # the output's text (cut at a stop string), when there is a tokenizer
    detok: IncrementalDetokenizer | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def seed(self) -> int | None:
        s = self.params.seed
        return None if s is None else (s + self.index) % 2**63

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Still has prompt tokens to score (only completion 0 of a request scores them; its
        siblings share the same prompt)."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and len(self.prompt_logprobs) < self.prompt_len)
