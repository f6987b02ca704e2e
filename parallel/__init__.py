"""Rank arithmetic, sharded layers, pipeline split and shard rules."""

from trtdist.parallel.mapping import Mapping
from trtdist.parallel.pipeline import split_layers

__all__ = ["Mapping", "split_layers"]
