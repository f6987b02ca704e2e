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
from trtdist.engine.checkpoint import HFCheckpoint, open_checkpoint, resolve_quant
from trtdist.engine.gguf_source import GGUFCheckpoint
from trtdist.engine.source import ModelSource
from trtdist.models.llama import LlamaStage
from trtdist.models.llama_weights import process_linears, shard_llama
from trtdist.parallel.layers import ColumnParallelLinear, RowParallelLinear, make_linear_method
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.quant import QuantConfig


def source_quant(source: ModelSource, quant: str,
                 ckpt: HFCheckpoint | GGUFCheckpoint | None = None) -> QuantConfig:
    """The scheme this source runs with: an engine's is fixed at build (asking for another
    is an error); a Hugging Face checkpoint is quantized (or dequantized) on the fly; dummy
    weights take `quant` ('auto' = none)."""
    if source.kind == "engine":
        assert source.engine_meta is not None
        built = QuantConfig.from_dict(source.engine_meta["build"].get("quant"))
        if quant not in ("auto", built.method):
            raise ValueError(f"engine {source.path} was built with quantization "
                             f"{built.method!r}; --quant {quant} needs a rebuild (or pass "
                             "--quant auto)")
        return built
    return resolve_quant(quant, ckpt.quant if ckpt is not None else None)


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
    done: set[str] = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.method.dummy_fill(mod, gen)  # random weights in the method's own layout
            if mod.bias is not None:
                mod.bias.data.zero_()
            done.update(f"{prefix}.{n}" for n, _ in mod.named_parameters())
    for name, p in model.named_parameters():
        if name in done:
            continue
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def load_stage(source: ModelSource, mapping: Mapping, tp: Communicator, device: torch.device,
               dtype: str = "auto", pp_partition: Sequence[int] | None = None,
               verify_checksums: bool = True, seed: int = 0,
               quant: str = "auto") -> LlamaStage:
    """Build this rank's `LlamaStage` and fill it from `source`. `quant` ('auto', 'none',
    'fp8') picks the linear method where the source does not fix it (see `source_quant`)."""
    cfg = source.config
    partition = engine_partition(source, mapping) or pp_partition
    stages = validate_parallelism(cfg, mapping.tp_size, mapping.pp_size, partition)
    layers = stages[mapping.pp_rank]
    torch_dtype = stage_dtype(source, dtype)
    ckpt = None
    if source.kind in ("hf", "gguf"):
        assert source.path is not None
        ckpt = open_checkpoint(source.path)
    method = make_linear_method(source_quant(source, quant, ckpt))
    model = LlamaStage(cfg, mapping, layers, tp, torch_dtype, device, quant=method)
    where = f"rank {mapping.rank}"
    with torch.no_grad():
        if source.kind == "engine":
            _copy_into(model, _engine_tensors(source, mapping.rank, verify_checksums), where)
        elif ckpt is not None:
            where = f"{where} loading {Path(ckpt.path)}"
            cq = ckpt.quant
            shard = shard_llama(ckpt.get, cfg, mapping, layers,
                                weight_scales=cq is not None and cq.block is None,
                                input_scales=cq is not None and cq.static_inputs)
            _copy_into(model, process_linears(shard, method, torch_dtype, where), where)
        else:
            _dummy_fill(model, seed, mapping.rank)
    return model.eval()
