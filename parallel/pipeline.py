"""Which layers each pipeline stage runs."""

from __future__ import annotations

from collections.abc import Sequence


def split_layers(num_layers: int, pp_size: int,
                 partition: Sequence[int] | None = None) -> list[range]:
    """Layer ranges per stage: even, with the remainder on the earliest stages.

    The first stage also embeds and the last also computes logits, so giving the extra
    layers to early stages would not balance better in general; `partition` overrides it
    (e.g. `[3, 5]` for 8 layers on 2 stages).
    """
    if pp_size < 1:
        raise ValueError(f"pp_size must be >= 1, got {pp_size}")
    if partition is not None:
        partition = list(partition)
        if len(partition) != pp_size:
            raise ValueError(f"pipeline partition {partition} has {len(partition)} entries, "
                             f"need one per stage ({pp_size})")
        if any(n < 1 for n in partition) or sum(partition) != num_layers:
            raise ValueError(f"pipeline partition {partition} must be positive and sum to the "
                             f"model's {num_layers} layers (sums to {sum(partition)})")
        counts = partition
    else:
        if pp_size > num_layers:
            raise ValueError(f"pp_size {pp_size} exceeds the model's {num_layers} layers; "
                             "each stage needs at least one layer")
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (1 if i < extra else 0) for i in range(pp_size)]
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges
