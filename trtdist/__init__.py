"""trtdist: multi-GPU distributed LLM inference launched over MPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["DistributedLLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from trtdist.llm import DistributedLLM
    from trtdist.sampling_params import SamplingParams


def __getattr__(name: str) -> object:
    # Lazy, so that `import trtdist` (e.g. by the CLI's --help) does not import torch and MPI.
    if name == "DistributedLLM":
        from trtdist.llm import DistributedLLM

        return DistributedLLM
    if name == "SamplingParams":
        from trtdist.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'trtdist' has no attribute {name!r}")
