#!/usr/bin/env bash
# On a lent GPU machine: install trtdist (no network), run the GPU and multi-rank tests.
# Results land in $OUT (gpu_tests.log).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v -i warning | tail -2
python3 -c "import torch, transformers, mpi4py; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
python3 -c "from trtdist.comm.nccl import nccl_library as l; print('nccl', l().version(), l().path)"
python3 -m pytest -v -rs ${PYTEST_ARGS:-tests/test_comm.py tests/test_equivalence.py} 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed|bf16|Error" | tail -60
