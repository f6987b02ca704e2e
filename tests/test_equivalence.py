"""Sharded engines under mpirun match Hugging Face transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MPI_SCRIPTS, hf_reference, mpirun, need_devices, relative_error

from trtdist.engine.build import build_engine

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128, 1, 77, 31, 200, 8, 19, 23]
NEW_TOKENS = 32
MODELS = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def references(hf_models: dict[str, Path]) -> dict[str, tuple[torch.Tensor, list[int]]]:
    return {k: hf_reference(hf_models[k], PROMPT, NEW_TOKENS) for k in MODELS}


@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_engines_match_transformers(tp: int, pp: int, hf_models: dict[str, Path],
                                    references: dict, tmp_path: Path) -> None:
    need_devices(tp * pp)
    engines = [build_engine(hf_models[k], tmp_path / k, tp, pp, "float32", progress=False)
               for k in MODELS]
    # (2, 1) also loads the Hugging Face directories directly (sharded on the fly).
    dirs = engines + ([hf_models[k] for k in MODELS] if (tp, pp) == (2, 1) else [])
    out = tmp_path / "out.npz"
    mpirun(tp * pp, [str(MPI_SCRIPTS / "run_model.py"), str(out), str(tp), str(pp), "auto",
                     ",".join(map(str, PROMPT)), str(NEW_TOKENS), *map(str, dirs)])
    res = np.load(out)
    for i, d in enumerate(dirs):
        kind = Path(d).name
        ref_logits, ref_tokens = references[kind]
        err = relative_error(torch.from_numpy(res[f"logits{i}"]), ref_logits)
        assert err <= 1e-4, f"{kind} {d}: logits relative error {err:.2e}"
        assert res[f"tokens{i}"].tolist() == ref_tokens, f"{kind} {d}: greedy tokens differ"


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (2, 2)])
def test_bf16_engines_match_transformers_bf16(tp: int, pp: int,
                                              hf_models_bf16: dict[str, Path],
                                              tmp_path: Path) -> None:
    hf_models = hf_models_bf16
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs, have {torch.cuda.device_count()}")
    import transformers

    engines = [build_engine(hf_models[k], tmp_path / k, tp, pp, "bfloat16", progress=False)
               for k in MODELS]
    out = tmp_path / "out.npz"
    mpirun(tp * pp, [str(MPI_SCRIPTS / "run_model.py"), str(out), str(tp), str(pp), "auto",
                     ",".join(map(str, PROMPT)), "1", *map(str, engines)])
    res = np.load(out)
    x = torch.tensor([PROMPT]).cuda()
    for i, k in enumerate(MODELS):
        with torch.no_grad():
            ref16, ref32 = (transformers.AutoModelForCausalLM.from_pretrained(
                hf_models[k], dtype=dt).cuda().eval()(x).logits[0].float().cpu()
                for dt in (torch.bfloat16, torch.float32))
        ours = torch.from_numpy(res[f"logits{i}"])
        norm_err = float((ours - ref16).norm() / ref16.norm())
        max_err = relative_error(ours, ref16)
        print(f"bf16 tp={tp} pp={pp} {k}: vs transformers bf16: norm-relative {norm_err:.2e}, "
              f"max-relative {max_err:.2e}; vs fp32: ours "
              f"{relative_error(ours, ref32):.2e}, transformers bf16 "
              f"{relative_error(ref16, ref32):.2e}")
        assert max_err <= 2e-2, f"{k}: bf16 logits relative error {max_err:.2e}"
        # As close to the fp32 truth as transformers' own bf16 is.
        assert relative_error(ours, ref32) <= 1.5 * relative_error(ref16, ref32)
