"""Hand-written CUDA kernels, compiled at run time with NVRTC and launched on PyTorch's
current stream (`cuda.bindings`, the CUDA Python driver and NVRTC bindings).

Why not Triton for these: some decode kernels need control Triton does not give (tensor-core
fragments loaded straight from global memory, registers held across the programmatic-
dependent-launch wait); see `kernels/fp8_gemv_cuda.cu`. Compiled once per (device, source,
parameters) and cached for the process: under CUDA graphs only the capture launches them.

`available(device)` says whether this path can run (a CUDA device, `cuda.bindings` and NVRTC
importable, not turned off by TRTDIST_CUDA_KERNELS=0); callers keep a Triton or torch path
for when it cannot, and fall back to it when a compile fails (`CudaJitError`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENV = "TRTDIST_CUDA_KERNELS"  # "0": never use the hand-written CUDA kernels
_log = logging.getLogger("trtdist")
_lock = threading.Lock()
_functions: dict[tuple[int, str, str, tuple[tuple[str, int], ...]], CudaFunction] = {}
_available: dict[int, bool] = {}
_sources: dict[Path, tuple[str, str]] = {}  # path -> (source, digest)


class CudaJitError(RuntimeError):
    """A CUDA kernel failed to compile, load or launch (the message says which and why)."""


def _bindings() -> tuple[Any, Any]:
    from cuda.bindings import driver, nvrtc  # imported lazily: optional, GPU machines only

    return driver, nvrtc


def available(device: torch.device) -> bool:
    """Whether hand-written CUDA kernels can run on `device` (see the module docstring)."""
    if device.type != "cuda" or os.environ.get(ENV, "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _available.get(index)
    if ok is None:
        try:
            _bindings()
            ok = True
        except Exception as e:  # noqa: BLE001 - any import failure means: not available
            _log.info("CUDA kernels unavailable (cuda.bindings / NVRTC: %s); using Triton", e)
            ok = False
        _available[index] = ok
    return ok


def _check(result: Any, what: str) -> Any:
    """cuda.bindings calls return `(status, value)`: the value, or raise on a failure."""
    status = result[0]
    if int(status) != 0:
        raise CudaJitError(f"{what} failed: {status!r}")
    return result[1]


@dataclass(frozen=True)
class CudaFunction:
    """A loaded kernel: launch it with `launch`."""

    name: str
    handle: Any
    device_index: int

    def launch(self, grid: int, block: int, args: tuple[Any, ...],
               types: tuple[Any, ...], *, pdl: bool, shared: int = 0,
               cooperative: bool = False) -> None:
        """Launch on PyTorch's current stream of the function's device (the capturing stream
        under a CUDA graph) with a 1-D grid and block. `args` are ints (device pointers:
        `tensor.data_ptr()`), `types` their ctypes types. `pdl`: programmatic dependent
        launch (the kernel may start while the previous one drains; it must
        `griddepcontrol.wait` first). `shared`: dynamic shared memory in bytes (above the
        default 48 KB the function's limit is raised to it). `cooperative`: every CTA is
        resident at once or the launch fails (kernels with grid barriers)."""
        driver, _ = _bindings()
        if shared > 48 * 1024:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            status = driver.cuFuncSetAttribute(self.handle, attr, shared)[0]
            if int(status) != 0:
                raise CudaJitError(f"{self.name}: {shared} bytes of shared memory refused: "
                                   f"{status!r}")
        s = torch.cuda.current_stream(self.device_index)
        cfg = driver.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
        cfg.sharedMemBytes = shared
        cfg.hStream = driver.CUstream(s.cuda_stream)
        attrs = []
        if pdl:
            attr = driver.CUlaunchAttribute()
            attr.id = (driver.CUlaunchAttributeID
                       .CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
            attr.value.programmaticStreamSerializationAllowed = 1
            attrs.append(attr)
        if cooperative:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            attr.value.cooperative = 1
            attrs.append(attr)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        status = driver.cuLaunchKernelEx(cfg, self.handle, (args, types), 0)[0]
        if int(status) != 0:
            raise CudaJitError(f"launch of {self.name} failed: {status!r}")


def _compile(source: str, name: str, defines: dict[str, int], arch: str) -> bytes:
    _, nvrtc = _bindings()
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        # the shared device helpers (cuda_common.cuh) sit beside this module
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17",
                f"--include-path={Path(__file__).parent}".encode()]
        opts += [f"-D{k}={int(v)}".encode() for k, v in sorted(defines.items())]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if int(status) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaJitError(f"NVRTC could not compile {name} with {defines}: "
                               f"{log.decode(errors='replace').strip()}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        status = nvrtc.nvrtcGetCUBIN(prog, cubin)[0]
        if int(status) != 0:
            raise CudaJitError(f"nvrtcGetCUBIN({name}) failed: {status!r}")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def load(source_file: str | Path, name: str, defines: dict[str, int],
         device: torch.device) -> CudaFunction:
    """The kernel `name` of the CUDA source file, compiled for `device`'s architecture with
    `defines` (-D NAME=VALUE) and loaded into its primary context; cached."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = Path(source_file)
    cached = _sources.get(path)
    if cached is None:  # read once: this runs on every eager launch
        text = path.read_text()
        cached = _sources[path] = (text, hashlib.sha1(text.encode()).hexdigest())
    source, digest = cached
    key = (index, digest, name, tuple(sorted(defines.items())))
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        driver, _ = _bindings()
        major, minor = torch.cuda.get_device_capability(index)
        # NOTE: "a" targets (sm_90a) unlock wgmma / setmaxnreg; nothing here needs them, and the
        # plain target runs on every GPU of that capability.
        cubin = _compile(source, name, defines, f"sm_{major}{minor}")
        with torch.cuda.device(index):
            torch.cuda.current_stream()  # makes the primary context current on this thread
            module = _check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({name})")
            handle = _check(driver.cuModuleGetFunction(module, name.encode()),
                            f"cuModuleGetFunction({name})")
        fn = CudaFunction(name, handle, index)
        _functions[key] = fn
        _log.debug("CUDA kernel %s compiled for sm_%d%d with %s", name, major, minor, defines)
        return fn


POINTER = ctypes.c_void_p  # the ctypes type of a device-pointer argument of `launch`
