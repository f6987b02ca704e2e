"""Load one rank's shard: from its engine file, from a Hugging Face checkpoint or a GGUF file
(sharded on the fly), or as dummy random weights for speed work."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from trtdist.comm.base import Communicator
from trtdist.config import DTYPE_NAMES, parse_dtype
from trtdist.engine.build import rank_file, resolve_dtype, sha256_file, validate_parallelism
from trtdist.engine.checkpoint import open_checkpoint
from trtdist.engine.source import ModelSource
from trtdist.models.llama import LlamaStage
from trtdist.models.llama_weights import shard_llama
from trtdist.parallel.mapping import Mapping


def stage_dtype(source: ModelSource, dtype: str) -> torch.dtype:
    if source.kind == "engine":
        assert source.engine_meta is not None
        built = parse_dtype(source.engine_meta["build"]["dtype"])
        if dtype not in ("auto", DTYPE_NAMES[built]) and parse_dtype(dtype) != built:
            raise ValueError(f"engine {source.path} was built for {DTYPE_NAMES[built]}; "
                             f"--dtype {dtype} needs a rebuild (or pass --dtype auto)")
        return built
    return resolve_dtype(dtype, source.config.checkpoint_dtype())


def engine_partition(source: ModelSource, mapping: Mapping) -> list[int] | None:
    """The engine's pipeline split, after checking the world matches the engine."""
    if source.kind != "engine":
        return None
    assert source.engine_meta is not None
    em = source.engine_meta["mapping"]
    if (em["tp_size"], em["pp_size"]) != (mapping.tp_size, mapping.pp_size):
        raise ValueError(
            f"engine {source.path} was built for tp_size={em['tp_size']} pp_size="
            f"{em['pp_size']} ({em['world_size']} ranks) but this run has tp_size="
            f"{mapping.tp_size} pp_size={mapping.pp_size} ({mapping.world_size} ranks)")
    return list(em["pp_partition"])


def _copy_into(model: LlamaStage, tensors: Iterable[tuple[str, torch.Tensor]],
               where: str) -> None:
    params = dict(model.named_parameters())
    seen = set()
    for name, tensor in tensors:
        if name not in params:
            raise ValueError(f"{where}: unexpected tensor {name!r} (not part of this rank's shard)")
        p = params[name]
        if tuple(tensor.shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(p.shape)}")
        p.data.copy_(tensor.to(p.dtype))
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{where}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")


def _engine_tensors(source: ModelSource, rank: int,
                    verify: bool) -> Iterable[tuple[str, torch.Tensor]]:
    assert source.path is not None and source.engine_meta is not None
    name = rank_file(rank)
    path = source.path / name
    expected = source.engine_meta["files"].get(name)
    if expected is None:
        raise ValueError(f"engine config lists no file for rank {rank}")
    if not path.exists():
        raise FileNotFoundError(f"rank {rank}: engine file {path} is missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(f"rank {rank}: engine file {path} has {size} bytes, the engine config "
                         f"says {expected['bytes']} (truncated or replaced?)")
    if verify and sha256_file(path) != expected["sha256"]:
        raise ValueError(f"rank {rank}: engine file {path} fails its sha256 checksum "
                         "(corrupt or replaced); rebuild the engine")
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("rank") != str(rank):
                raise ValueError(f"engine file {path} holds rank {(f.metadata() or {}).get('rank')}"
                                 f"'s shard, not rank {rank}'s")
            for key in f.keys():
                yield key, f.get_tensor(key)
    except SafetensorError as e:
        raise ValueError(f"rank {rank}: cannot read engine file {path}: {e}") from None


def _dummy_fill(model: LlamaStage, seed: int, rank: int) -> None:
    gen = torch.Generator(device=model.device).manual_seed(seed * 1009 + rank)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def load_stage(source: ModelSource, mapping: Mapping, tp: Communicator, device: torch.device,
               dtype: str = "auto", pp_partition: Sequence[int] | None = None,
               verify_checksums: bool = True, seed: int = 0) -> LlamaStage:
    """Build this rank's `LlamaStage` and fill it from `source`."""
    cfg = source.config
    partition = engine_partition(source, mapping) or pp_partition
    stages = validate_parallelism(cfg, mapping.tp_size, mapping.pp_size, partition)
    layers = stages[mapping.pp_rank]
    torch_dtype = stage_dtype(source, dtype)
    model = LlamaStage(cfg, mapping, layers, tp, torch_dtype, device)
    where = f"rank {mapping.rank}"
    with torch.no_grad():
        if source.kind == "engine":
            _copy_into(model, _engine_tensors(source, mapping.rank, verify_checksums), where)
        elif source.kind in ("hf", "gguf"):
            assert source.path is not None
            ckpt = open_checkpoint(source.path)
            _copy_into(model, shard_llama(ckpt.get, cfg, mapping, layers),
                       f"{where} loading {Path(source.path)}")
        else:
            _dummy_fill(model, seed, mapping.rank)
    return model.eval()
