"""NCCL for GPU tensors through a thin ctypes binding of libnccl.

NOTE (why ctypes, not cupy or torch.distributed): torch.distributed would bring its own
process-group state and rendezvous, and its collectives cannot be issued while a CUDA graph
is being captured on a stream we choose. cupy's binding works here, but it is an optional
3rd-party dependency whose ABI we do not control. libnccl's C API is small and stable, so
we declare the dozen entries we use with their C signatures, open the library once, check
every return code, and pass an explicit stream to every call. Collectives therefore just
enqueue on the current torch stream, including one under CUDA-graph capture.
The unique id is created on group rank 0 and broadcast over MPI (the CPU control plane).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from functools import cache

import torch
from mpi4py import MPI

ncclResult_t = ctypes.c_int
ncclComm_t = ctypes.c_void_p
cudaStream_t = ctypes.c_void_p
buffer_t = ctypes.c_void_p


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


# ncclDataType_t values from nccl.h
_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4,
    torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9,
}
_SUM = 0  # ncclRedOp_t ncclSum

# name -> (restype, argtypes), each with its C signature.
_FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    # const char* ncclGetErrorString(ncclResult_t result)
    "ncclGetErrorString": (ctypes.c_char_p, [ncclResult_t]),
    # ncclResult_t ncclGetVersion(int *version)
    "ncclGetVersion": (ncclResult_t, [ctypes.POINTER(ctypes.c_int)]),
    # ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId)
    "ncclGetUniqueId": (ncclResult_t, [ctypes.POINTER(NcclUniqueId)]),
    # ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank)
    "ncclCommInitRank": (ncclResult_t,
                         [ctypes.POINTER(ncclComm_t), ctypes.c_int, NcclUniqueId, ctypes.c_int]),
    # ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
    #   ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream)
    "ncclAllReduce": (ncclResult_t, [buffer_t, buffer_t, ctypes.c_size_t, ctypes.c_int,
                                     ctypes.c_int, ncclComm_t, cudaStream_t]),
    # ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
    #   ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream)
    "ncclAllGather": (ncclResult_t, [buffer_t, buffer_t, ctypes.c_size_t, ctypes.c_int,
                                     ncclComm_t, cudaStream_t]),
    # ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
    #   ncclDataType_t datatype, int root, ncclComm_t comm, cudaStream_t stream)
    "ncclBroadcast": (ncclResult_t, [buffer_t, buffer_t, ctypes.c_size_t, ctypes.c_int,
                                     ctypes.c_int, ncclComm_t, cudaStream_t]),
    # ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype,
    #   int peer, ncclComm_t comm, cudaStream_t stream)
    "ncclSend": (ncclResult_t, [buffer_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                ncclComm_t, cudaStream_t]),
    # ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype,
    #   int peer, ncclComm_t comm, cudaStream_t stream)
    "ncclRecv": (ncclResult_t, [buffer_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                ncclComm_t, cudaStream_t]),
    # ncclResult_t ncclGroupStart()
    "ncclGroupStart": (ncclResult_t, []),
    # ncclResult_t ncclGroupEnd()
    "ncclGroupEnd": (ncclResult_t, []),
    # ncclResult_t ncclCommDestroy(ncclComm_t comm)
    "ncclCommDestroy": (ncclResult_t, [ncclComm_t]),
    # ncclResult_t ncclCommAbort(ncclComm_t comm)
    "ncclCommAbort": (ncclResult_t, [ncclComm_t]),
}


def _candidate_paths() -> list[str]:
    paths = []
    if env := os.environ.get("TRTDIST_NCCL_LIBRARY"):
        paths.append(env)
    # the nvidia-nccl-cu12 / -cu13 wheel, which torch's CUDA builds also load
    with contextlib.suppress(ImportError):
        import nvidia.nccl  # type: ignore[import-not-found]

        for root in nvidia.nccl.__path__:
            paths += sorted(glob.glob(os.path.join(root, "lib", "libnccl.so*")))
    return paths + ["libnccl.so.2", "libnccl.so"]


class NcclLibrary:
    """libnccl opened once, with every entry point declared and every call checked."""

    def __init__(self) -> None:
        errors = []
        for path in _candidate_paths():
            try:
                self.lib = ctypes.CDLL(path)
                self.path = path
                break
            except OSError as e:
                errors.append(f"{path}: {e}")
        else:
            raise RuntimeError(
                "could not load libnccl; install the cuda12/cuda13 extra (nvidia-nccl wheel) "
                "or set TRTDIST_NCCL_LIBRARY. Tried:\n  " + "\n  ".join(errors)
            )
        for name, (restype, argtypes) in _FUNCTIONS.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    def check(self, result: int, what: str) -> None:
        if result != 0:
            msg = self.lib.ncclGetErrorString(result).decode()
            raise RuntimeError(f"NCCL {what} failed with code {result}: {msg}")

    def version(self) -> str:
        v = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        major, rest = divmod(v.value, 10000)
        return f"{major}.{rest // 100}.{rest % 100}"

    def unique_id(self) -> NcclUniqueId:
        uid = NcclUniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return uid

    def init_rank(self, nranks: int, uid: NcclUniqueId, rank: int) -> ncclComm_t:
        comm = ncclComm_t()
        self.check(self.lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank),
                   f"ncclCommInitRank(rank {rank} of {nranks})")
        return comm


@cache
def nccl_library() -> NcclLibrary:
    return NcclLibrary()


def _dtype(tensor: torch.Tensor) -> int:
    try:
        return _DTYPES[tensor.dtype]
    except KeyError:
        raise ValueError(f"NCCL does not carry {tensor.dtype}") from None


def _stream() -> cudaStream_t:
    # The current stream, so that a call made under graph capture joins the graph.
    return cudaStream_t(torch.cuda.current_stream().cuda_stream)


class NcclCommunicator:
    """NCCL communicator over the ranks of an MPI intracommunicator (one GPU per rank)."""

    def __init__(self, mpi_comm: MPI.Intracomm, device: torch.device) -> None:
        self.lib = nccl_library()
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.device = device
        uid = self.lib.unique_id() if self.rank == 0 else NcclUniqueId()
        raw = bytearray(bytes(uid.internal)) if self.rank == 0 else bytearray(128)
        mpi_comm.Bcast(raw, root=0)
        ctypes.memmove(ctypes.addressof(uid.internal), bytes(raw), 128)
        with torch.cuda.device(device):
            self.comm = self.lib.init_rank(self.size, uid, self.rank)
            # Warm the connection once so the first real call is not the slow one.
            self.all_reduce(torch.zeros(1, device=device))
            torch.cuda.synchronize(device)

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            raise ValueError(f"NCCL rank {self.rank}: tensor on {tensor.device}, "
                             f"communicator on {self.device}")
        if not tensor.is_contiguous():
            raise ValueError("NCCL needs contiguous tensors")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        self._check_tensor(tensor)
        ptr = buffer_t(tensor.data_ptr())
        self.lib.check(self.lib.lib.ncclAllReduce(ptr, ptr, tensor.numel(), _dtype(tensor), _SUM,
                                                  self.comm, _stream()), "ncclAllReduce")
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        if self.size == 1:
            return out.copy_(tensor)
        self._check_tensor(tensor)
        self.lib.check(self.lib.lib.ncclAllGather(
            buffer_t(tensor.data_ptr()), buffer_t(out.data_ptr()), tensor.numel(),
            _dtype(tensor), self.comm, _stream()), "ncclAllGather")
        return out

    def gather(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """NCCL has no gather: point-to-point sends to `dst` fused into one group call, so
        they proceed together and can be captured in a CUDA graph."""
        if not 0 <= dst < self.size:
            raise ValueError(f"gather: dst must be a group rank in [0, {self.size}), got {dst}")
        tensor = tensor.contiguous()
        if self.rank == dst:
            out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]),
                              dtype=tensor.dtype, device=tensor.device)
            out[dst * tensor.shape[0]:(dst + 1) * tensor.shape[0]].copy_(tensor)
            parts = out.view(self.size, -1)
        if self.size == 1:
            return out
        self._check_tensor(tensor)
        lib, stream, dtype = self.lib.lib, _stream(), _dtype(tensor)
        self.lib.check(lib.ncclGroupStart(), "ncclGroupStart")
        try:
            if self.rank == dst:
                for peer in range(self.size):
                    if peer != dst:
                        self.lib.check(lib.ncclRecv(buffer_t(parts[peer].data_ptr()),
                                                    tensor.numel(), dtype, peer, self.comm,
                                                    stream), f"ncclRecv(from {peer})")
            else:
                self.lib.check(lib.ncclSend(buffer_t(tensor.data_ptr()), tensor.numel(), dtype,
                                            dst, self.comm, stream), f"ncclSend(to {dst})")
        finally:
            self.lib.check(lib.ncclGroupEnd(), "ncclGroupEnd")
        return out if self.rank == dst else tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.size == 1:
            return tensor
        self._check_tensor(tensor)
        ptr = buffer_t(tensor.data_ptr())
        self.lib.check(self.lib.lib.ncclBroadcast(ptr, ptr, tensor.numel(), _dtype(tensor), src,
                                                  self.comm, _stream()), "ncclBroadcast")
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._check_tensor(tensor)
        self.lib.check(self.lib.lib.ncclSend(buffer_t(tensor.data_ptr()), tensor.numel(),
                                             _dtype(tensor), dst, self.comm, _stream()),
                       f"ncclSend(to {dst})")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._check_tensor(tensor)
        self.lib.check(self.lib.lib.ncclRecv(buffer_t(tensor.data_ptr()), tensor.numel(),
                                             _dtype(tensor), src, self.comm, _stream()),
                       f"ncclRecv(from {src})")
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))
        torch.cuda.synchronize(self.device)

    def destroy(self) -> None:
        if getattr(self, "comm", None):
            torch.cuda.synchronize(self.device)
            self.lib.check(self.lib.lib.ncclCommDestroy(self.comm), "ncclCommDestroy")
            self.comm = None
        if self.mpi_comm not in (MPI.COMM_WORLD, MPI.COMM_SELF, MPI.COMM_NULL):
            self.mpi_comm.Free()
        self.mpi_comm = MPI.COMM_NULL
