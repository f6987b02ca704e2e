"""`trtdist build`: shard (and optionally quantize) a Hugging Face checkpoint or a GGUF file
into one safetensors file per rank."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from trtdist.config import DTYPE_NAMES, parse_dtype
from trtdist.engine.checkpoint import CheckpointQuant, open_checkpoint, resolve_quant
from trtdist.engine.gguf_source import GGUFCheckpoint
from trtdist.engine.source import ENGINE_FORMAT, ENGINE_VERSION
from trtdist.models.llama_weights import process_linears, required_hf_names, shard_llama
from trtdist.parallel.layers import make_linear_method
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.pipeline import split_layers
from trtdist.parallel.quant import QuantConfig
from trtdist.parallel.shard import attention_shard

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def validate_parallelism(cfg, tp_size: int, pp_size: int,  # type: ignore[no-untyped-def]
                         partition: Sequence[int] | None = None) -> list[range]:
    """Fail early, naming the numbers, if the model cannot be split this way."""
    Mapping(tp_size * pp_size, tp_size, pp_size, 0)
    for r in range(tp_size):
        attention_shard(cfg.num_heads, cfg.num_kv_heads, tp_size, r)
    if cfg.intermediate_size % tp_size:
        raise ValueError(f"intermediate_size {cfg.intermediate_size} is not divisible by "
                         f"tp_size {tp_size}")
    return split_layers(cfg.num_layers, pp_size, partition)


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    return checkpoint_dtype if name == "auto" else parse_dtype(name)


def build_engine(hf_dir: str | Path, out_dir: str | Path, tp_size: int = 1, pp_size: int = 1,
                 dtype: str = "auto", pp_partition: Sequence[int] | None = None,
                 progress: bool = True, quant: str = "auto",
                 calib_data: str | Path | None = None) -> Path:
    """Write `out_dir/config.json` and `out_dir/rank{r}.safetensors` for every rank.

    `hf_dir` is a Hugging Face checkpoint directory or a llama `.gguf` file.

    `quant`: 'none', 'fp8' (E4M3 weights, one scale per output channel computed from each
    rank's shard; activations per token at run time) or 'auto' (FP8 if the checkpoint is).
    `calib_data` (a text file, one prompt a line, or JSONL with "text"/"prompt" fields) makes
    FP8 activations static: the prompts run through the unquantized model here, and each
    linear layer's input amax / 448 becomes its `input_scale`.
    """
    ckpt = open_checkpoint(hf_dir)
    cfg = ckpt.config
    stages = validate_parallelism(cfg, tp_size, pp_size, pp_partition)
    torch_dtype = resolve_dtype(dtype, cfg.checkpoint_dtype())
    qc = resolve_quant(quant, ckpt.quant, static=calib_data is not None)
    if calib_data is not None and not qc.is_quantized:
        raise ValueError("--calib-data calibrates FP8 activation scales; it needs --quant fp8")
    method = make_linear_method(qc)
    world = tp_size * pp_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(world):  # check every needed tensor before writing anything
        m = Mapping(world, tp_size, pp_size, rank)
        missing = [n for n in required_hf_names(cfg, m, stages[m.pp_rank]) if n not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {hf_dir} lacks {len(missing)} tensor(s) needed by "
                             f"rank {rank}, e.g. {missing[:3]}")
    input_scales, calib_info = None, None
    if calib_data is not None:
        from trtdist.engine.calibrate import calibrate_input_scales

        input_scales, calib_info = calibrate_input_scales(hf_dir, calib_data, dtype)
    cq = ckpt.quant
    files: dict[str, dict[str, object]] = {}
    bar = tqdm(total=world, desc="build", unit="rank", disable=not progress)
    for rank in range(world):
        m = Mapping(world, tp_size, pp_size, rank)
        shard = shard_llama(ckpt.get, cfg, m, stages[m.pp_rank],
                            weight_scales=cq is not None and cq.block is None,
                            input_scales=cq is not None and cq.static_inputs and not input_scales)
        tensors = {name: t.contiguous() for name, t in
                   process_linears(shard, method, torch_dtype, f"rank {rank}", input_scales)}
        path = out / rank_file(rank)
        save_file(tensors, str(path), metadata={"rank": str(rank), "format": ENGINE_FORMAT})
        files[rank_file(rank)] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        bar.update(1)
    bar.close()
    if isinstance(ckpt, GGUFCheckpoint):
        for name, text in ckpt.tokenizer_files().items():
            (out / name).write_text(text)
    else:
        for name in TOKENIZER_FILES:
            if (Path(hf_dir) / name).exists():
                shutil.copy2(Path(hf_dir) / name, out / name)
    meta = {
        "format": ENGINE_FORMAT, "version": ENGINE_VERSION,
        "model": cfg.to_dict(),
        "mapping": {"world_size": world, "tp_size": tp_size, "pp_size": pp_size,
                    "pp_partition": [len(s) for s in stages]},
        "build": {"dtype": DTYPE_NAMES[torch_dtype], "quant": _quant_meta(qc, cq, calib_info),
                  "source": str(Path(hf_dir).resolve())},
        "files": files,
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def _quant_meta(qc: QuantConfig, ckpt_quant: CheckpointQuant | None,
                calib: dict[str, Any] | None) -> dict[str, Any] | None:
    """`build.quant` of config.json: the scheme, and where its scales came from."""
    meta = qc.to_dict()
    if meta is None:
        return None
    meta["weight_scales"] = ("from the checkpoint" if ckpt_quant is not None
                             and ckpt_quant.block is None else "amax / 448 per rank's shard")
    if ckpt_quant is not None:
        meta["checkpoint"] = ckpt_quant.to_dict()
    if calib is not None:
        meta["calibration"] = calib
    return meta
