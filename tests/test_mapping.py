"""Mapping, pipeline split and shard rules: table-driven, pure CPU."""

from __future__ import annotations

import pytest
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.pipeline import split_layers
from trtdist.parallel.shard import attention_shard, vocab_range

# (world, tp, pp, rank) -> (tp_rank, pp_rank, tp_group, pp_group, prev, next)
MAPPINGS = [
    ((1, 1, 1, 0), (0, 0, [0], [0], None, None)),
    ((4, 2, 2, 0), (0, 0, [0, 1], [0, 2], None, 2)),
    ((4, 2, 2, 3), (1, 1, [2, 3], [1, 3], 1, None)),
    ((8, 4, 2, 5), (1, 1, [4, 5, 6, 7], [1, 5], 1, None)),
    ((8, 2, 4, 5), (1, 2, [4, 5], [1, 3, 5, 7], 3, 7)),
    ((4, 1, 4, 2), (0, 2, [2], [0, 1, 2, 3], 1, 3)),
]


@pytest.mark.parametrize("args,want", MAPPINGS)
def test_mapping_table(args: tuple[int, ...], want: tuple) -> None:
    m = Mapping(*args)
    assert (m.tp_rank, m.pp_rank, m.tp_group, m.pp_group, m.prev_stage_rank,
            m.next_stage_rank) == want
    assert m.rank_of(m.tp_rank, m.pp_rank) == m.rank


@pytest.mark.parametrize("args,match", [
    ((3, 2, 2, 0), "world size 3 != tp_size 2 x pp_size 2 = 4"),
    ((4, 4, 1, 4), "rank 4 is outside a world of 4"),
    ((0, 1, 1, 0), "world_size must be >= 1"),
])
def test_mapping_rejects(args: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mapping(*args)


@pytest.mark.parametrize("layers,pp,part,want", [
    (8, 2, None, [range(0, 4), range(4, 8)]),
    (7, 3, None, [range(0, 3), range(3, 5), range(5, 7)]),
    (8, 2, [3, 5], [range(0, 3), range(3, 8)]),
])
def test_split_layers(layers: int, pp: int, part: list[int] | None, want: list[range]) -> None:
    assert split_layers(layers, pp, part) == want


@pytest.mark.parametrize("layers,pp,part,match", [
    (2, 3, None, "pp_size 3 exceeds the model's 2 layers"),
    (8, 2, [3, 4], "sum to the model's 8 layers"),
    (8, 2, [8], "one per stage"),
])
def test_split_layers_rejects(layers: int, pp: int, part: list[int] | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_layers(layers, pp, part)


@pytest.mark.parametrize("heads,kv,tp,rank,want", [
    (32, 8, 4, 1, (8, 8, 2, 2)),  # GQA split: (q_start, q_heads, kv_start, kv_heads)
    (32, 8, 8, 5, (20, 4, 5, 1)),  # one KV head each
    (64, 8, 16, 5, (20, 4, 2, 1)),  # KV heads replicated on 2 ranks each
    (4, 1, 4, 3, (3, 1, 0, 1)),  # MQA: the one KV head everywhere
])
def test_attention_shard(heads: int, kv: int, tp: int, rank: int, want: tuple) -> None:
    s = attention_shard(heads, kv, tp, rank)
    assert (s.q_start, s.q_heads, s.kv_start, s.kv_heads) == want
    group = heads // kv  # every query head on this rank uses a KV head this rank holds
    for h in range(s.q_start, s.q_start + s.q_heads):
        assert s.kv_start <= h // group < s.kv_start + s.kv_heads


@pytest.mark.parametrize("heads,kv,tp,match", [
    (4, 2, 3, "3 tensor-parallel ranks cannot split 4 attention heads"),
    (24, 6, 8, "tp_size 8 exceeds num_key_value_heads 6 and is not a multiple"),
    (48, 12, 8, "num_key_value_heads = 12 is not divisible by tp_size 8"),
    (6, 4, 1, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
])
def test_attention_shard_rejects(heads: int, kv: int, tp: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attention_shard(heads, kv, tp, 0)


def test_vocab_range_pads() -> None:
    assert [vocab_range(301, 4, r) for r in range(4)] == [
        (0, 76, 76), (76, 152, 76), (152, 228, 76), (228, 301, 76)]
