"""Model definitions (one pipeline stage of one tensor-parallel rank each)."""

from trtdist.models.llama import LlamaStage

__all__ = ["LlamaStage"]
