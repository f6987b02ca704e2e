"""CUDA graphs for decode: one graph per batch-size bucket, replayed when a step fits.

A decode step of S sequences runs the graph of the smallest bucket B >= S; rows S..B-1 are
padding (token 0, position 0, slot -1, seq_len 0, block table row 0 = the null block) that
the KV write skips and attention answers with zeros. Each graph runs this rank's stage on
static buffers: token ids (stage 0) or received hidden states (later stages) -> layers ->
final norm and LM head for all B rows (last stage). The TP all-reduces are inside the graph
(NCCL enqueues on the capturing stream); the pipeline recv into the static hidden buffer and
the send of the graph output stay outside, as eager NCCL calls. The sampler runs outside on
the real rows. All graphs share one memory pool, captured largest first so smaller ones
reuse its blocks (nano-vllm's `capture_cudagraph`).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from trtdist.kernels.attention import LayerKV
from trtdist.models.llama import LlamaStage
from trtdist.runtime.inputs import StepInputs, StepViews
from trtdist.runtime.plan import FORWARD, RETURN_ALL_LOGITS, StepPlan

log = logging.getLogger("trtdist")


def graph_batch_sizes(max_batch_size: int,
                      override: Sequence[int] | None = None) -> tuple[int, ...]:
    """The bucket ladder: 1, 2, 4, 8, then steps of 8 up to 256 and of 16 beyond, up to
    `max_batch_size` (which is always a bucket, so every decode batch fits one). `override`
    replaces the ladder; each size must be in [1, max_batch_size]."""
    if override is not None:
        sizes = sorted(set(int(b) for b in override))
        bad = [b for b in sizes if not 1 <= b <= max_batch_size]
        if not sizes or bad:
            raise ValueError(f"CUDA-graph batch sizes must be in [1, max_batch_size "
                             f"{max_batch_size}], got {list(override)}")
        return tuple(sizes)
    ladder = [1, 2, 4, 8, *range(16, 257, 8), *range(272, max_batch_size + 1, 16)]
    sizes = sorted({b for b in ladder if b <= max_batch_size} | {max_batch_size})
    return tuple(sizes)


def pick_bucket(batch_sizes: Sequence[int], plan: StepPlan) -> int | None:
    """The smallest bucket holding `plan`'s decode batch (`batch_sizes` sorted), or None
    when the step runs eagerly: prefill or mixed, all logits requested, or larger than every
    bucket."""
    s = plan.num_seqs
    if plan.num_tokens != s or s == 0 or s > batch_sizes[-1] or plan.flags & RETURN_ALL_LOGITS:
        return None
    return batch_sizes[bisect.bisect_left(batch_sizes, s)]


def padded_decode_plan(rows: int, block: int = 0) -> StepPlan:
    """A decode plan of `rows` one-token sequences whose only block is `block` (warm-up and
    memory measurement; block 0 is the null block)."""
    ones = np.ones(rows, dtype=np.int64)
    return StepPlan(FORWARD, np.zeros(rows, np.int64), np.zeros(rows, np.int64), ones, ones,
                    np.full((rows, 1), block, dtype=np.int64))


def run_stage(model: LlamaStage, kv_layers: Sequence[LayerKV],
              x: torch.Tensor, views: StepViews, meta: object,
              all_logits: bool, hidden_out: list[torch.Tensor] | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """This stage's forward. Last stage: logits of every row when `all_logits`, else of
    `views.logits_rows` (the full vocabulary on TP rank 0, which samples; the other TP ranks
    get their vocabulary slice, see `ParallelLMHead`); other stages: the hidden states to
    send on. `hidden_out`, if given,
    receives the last stage's final hidden states (prompt logprobs read them). `out`, with
    `all_logits`, receives the result (a CUDA graph's static output) and is returned."""
    h = model(x, kv_layers, model.context(views.positions, views.attention.slot_mapping, meta))
    if not model.mapping.is_last_stage:
        return h if out is None else out.copy_(h)
    if hidden_out is not None:
        hidden_out.append(h)
    if all_logits or views.logits_rows is None:
        return model.compute_logits(h, out=out)
    if views.logits_rows.numel() == 0:  # only partial prefill chunks (same on every rank)
        return torch.empty(0, model.cfg.vocab_size, device=h.device)
    return model.compute_logits(h.index_select(0, views.logits_rows))


def decode_body(model: LlamaStage, kv_layers: Sequence[LayerKV],
                inputs: StepInputs, hidden_in: torch.Tensor | None,
                bucket: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """What a decode graph of `bucket` rows runs: the stage on the static buffers, with the
    backend's capture metadata (fixed work whatever the lengths); the result goes to `out`
    when given."""
    views = inputs.capture_inputs(bucket)
    meta = model.attention_backend.prepare_for_capture(views.attention)
    x = views.input_ids if hidden_in is None else hidden_in[:bucket]
    return run_stage(model, kv_layers, x, views, meta, all_logits=True, out=out)


def measure_decode_memory(model: LlamaStage, inputs: StepInputs, hidden_in: torch.Tensor | None,
                          kv_layers: Sequence[LayerKV],
                          bucket: int) -> int:
    """Peak bytes one eager run of the `bucket` decode body allocates (against a small
    temporary KV pool): about what the graphs' shared pool will hold. Also JIT-compiles the
    kernels before capture."""
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        inputs.fill(padded_decode_plan(0), pad_to=bucket)  # padding only: nothing written
        decode_body(model, kv_layers, inputs, hidden_in, bucket)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class CUDAGraphRunner:
    """Captures and replays this rank's decode graphs (CUDA only)."""

    def __init__(self, model: LlamaStage, kv_layers: Sequence[LayerKV],
                 inputs: StepInputs, hidden_in: torch.Tensor | None,
                 batch_sizes: Sequence[int]) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.kv_layers = model, kv_layers
        self.inputs, self.hidden_in = inputs, hidden_in
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every bucket's graph writes its rows of one static output (logits or hidden states
        # `[largest bucket, ...]`, outside the graphs' pool): `outputs[b]` is a view of it.
        # NOTE: each graph keeping its own output held the sum of all buckets' logits (18 GB
        # of float32 logits for the 83 buckets up to 1024 with a 128k vocabulary), which
        # made capture run out of memory at --max-batch-size 1024.
        self.static_output: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _body(self, bucket: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_body(self.model, self.kv_layers, self.inputs, self.hidden_in, bucket, out)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one shared memory pool."""
        start = time.perf_counter()
        device = self.model.device
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for bucket in sorted(self.batch_sizes, reverse=True):
            # All-padding rows: attention reads nothing, the KV write skips every slot.
            self.inputs.fill(padded_decode_plan(0), pad_to=bucket)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                warm = self._body(bucket)  # warm-up: JIT compilation, lazy initialisation
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
            if self.static_output is None:  # the largest bucket comes first
                self.static_output = torch.empty((bucket, *warm.shape[1:]), dtype=warm.dtype,
                                                 device=device)
            del warm
            torch.cuda.empty_cache()  # the warm-up's blocks, for the graphs' pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bucket] = self._body(bucket, self.static_output[:bucket])
            self.graphs[bucket] = graph
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start
        log.debug("captured %d decode graphs %s in %.2f s", len(self.graphs), self.batch_sizes,
                  self.capture_seconds)

    def bucket_for(self, plan: StepPlan) -> int | None:
        """The bucket a step replays, or None when it runs eagerly (see `pick_bucket`)."""
        return pick_bucket(self.batch_sizes, plan) if self.graphs else None

    def replay(self, bucket: int) -> torch.Tensor:
        """Run the bucket's graph on the already-filled static inputs. Returns its static
        output: hidden states `[bucket, hidden]`, or last stage logits `[bucket, vocab]`."""
        self.graphs[bucket].replay()
        return self.outputs[bucket]
