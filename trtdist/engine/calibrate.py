"""Static FP8 activation scales: run calibration prompts through the unquantized model (one
rank, on this machine's CPU or GPU) and record the largest input of every linear layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trtdist.parallel.quant_fp8 import FP8_MAX


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a calibration file: JSONL (each line a string or an object with a "text"
    or "prompt" field) when it ends in .jsonl, else plain text, one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    prompts: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not valid JSON: {e}") from None
        text = item if isinstance(item, str) else (item.get("text") or item.get("prompt")
                                                   if isinstance(item, dict) else None)
        if not isinstance(text, str):
            raise ValueError(f"{path} line {n}: expected a string or an object with a "
                             "\"text\" or \"prompt\" string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"calibration file {path} holds no prompts")
    return prompts


def calibrate_input_scales(hf_dir: str | Path, calib_data: str | Path, dtype: str = "auto",
                           device: str = "auto", max_len: int = 2048
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per linear layer (engine name `layers.i.attn.qkv` ...): `{name.input_scale: [1]}` =
    amax of its input over all calibration tokens / 448, and a summary for config.json.

    NOTE: a row-parallel layer's input is split across TP ranks; the unsplit model's amax
    bounds every rank's slice, so one scale serves all ranks."""
    from mpi4py import MPI

    from trtdist.comm.world import World
    from trtdist.engine.source import resolve_model
    from trtdist.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from trtdist.runtime.rank import RankOptions, start_rank
    from trtdist.runtime.single import prompt_logits
    from trtdist.tokenizer import Tokenizer

    source = resolve_model(hf_dir)
    if source.tokenizer_dir is None:
        raise ValueError(f"calibration needs a tokenizer (tokenizer.json) in {hf_dir}")
    tok = Tokenizer(source.tokenizer_dir)
    limit = min(max_len, source.config.max_position_embeddings)
    ids = [tok.encode(p)[:limit] for p in read_prompts(calib_data)]
    ids = [x for x in ids if x]
    longest = max(len(x) for x in ids)
    runner = start_rank(World(MPI.COMM_SELF), source,
                        RankOptions(dtype=dtype, device=device, quant="none", max_batch_size=1,
                                    max_model_len=longest, verify_checksums=False))
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def track(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    for name, mod in runner.model.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            hooks.append(mod.register_forward_pre_hook(track(name)))
    try:
        for x in ids:
            prompt_logits(runner, x)
    finally:
        for h in hooks:
            h.remove()
        runner.close()
    scales = {f"{name}.input_scale": (a / FP8_MAX).clamp(min=1e-12).reshape(1).cpu()
              for name, a in amax.items()}
    info = {"file": str(Path(calib_data).resolve()), "prompts": len(ids),
            "tokens": sum(len(x) for x in ids)}
    return scales, info
