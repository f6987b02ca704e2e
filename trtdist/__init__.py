"""trtdist: multi-GPU distributed LLM inference launched over MPI."""

__version__ = "0.1.0"
