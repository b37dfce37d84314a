"""The CUDA driver API through ctypes: the few calls the launcher needs, each checked.

No Python package is needed to run a cuda artifact, only the NVIDIA driver's ``libcuda.so.1``.
Every failure is an LlmcError that names the call and the driver's error name.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from llmc.errors import LlmcError

COMPUTE_CAPABILITY_MAJOR = 75
COMPUTE_CAPABILITY_MINOR = 76
FUNC_MAX_DYNAMIC_SHARED = 8
STREAM_NON_BLOCKING = 1
CAPTURE_MODE_THREAD_LOCAL = 1


class CudaError(LlmcError):
    """No usable GPU or driver, or a driver call that failed."""


def _library() -> ctypes.CDLL:
    names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaError("no CUDA driver found (libcuda.so.1): run cuda artifacts on a machine with an NVIDIA GPU and "
                    "its driver, or build this model with --target cpu")


class Driver:
    """One device's primary context and one stream."""

    def __init__(self, device: int = 0):
        self.lib = _library()
        self.check("cuInit", 0)
        count = ctypes.c_int()
        self.check("cuDeviceGetCount", ctypes.byref(count))
        if count.value <= device:
            raise CudaError(f"the CUDA driver sees {count.value} GPUs, so device {device} does not exist")
        self.device = ctypes.c_int()
        self.check("cuDeviceGet", ctypes.byref(self.device), device)
        self.context = ctypes.c_void_p()
        self.check("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), self.device)
        self.check("cuCtxSetCurrent", self.context)
        self.stream = ctypes.c_void_p()
        self.check("cuStreamCreate", ctypes.byref(self.stream), STREAM_NON_BLOCKING)

    def check(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(text))
            raise CudaError(f"CUDA driver call {name} failed: {(text.value or b'error %d' % status).decode()}")

    def arch(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check("cuDeviceGetAttribute", ctypes.byref(major), COMPUTE_CAPABILITY_MAJOR, self.device)
        self.check("cuDeviceGetAttribute", ctypes.byref(minor), COMPUTE_CAPABILITY_MINOR, self.device)
        return major.value, minor.value

    # -- memory ------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self.check("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 256)))
        self.check("cuMemsetD8_v2", pointer, ctypes.c_ubyte(0), ctypes.c_size_t(max(nbytes, 256)))
        return pointer.value

    def free(self, pointer: int) -> None:
        self.lib.cuMemFree_v2(ctypes.c_uint64(pointer))

    def upload(self, pointer: int, host, nbytes: int) -> None:
        """Copy ``nbytes`` from a host address (int) or buffer to the device, ordered on the stream."""
        self.check("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(pointer), ctypes.c_void_p(host), ctypes.c_size_t(nbytes),
                   self.stream)

    def copy(self, dest: int, source: int, nbytes: int) -> None:
        """Device to device, ordered on the stream."""
        self.check("cuMemcpyDtoDAsync_v2", ctypes.c_uint64(dest), ctypes.c_uint64(source), ctypes.c_size_t(nbytes),
                   self.stream)

    def download(self, host: int, pointer: int, nbytes: int) -> None:
        self.check("cuMemcpyDtoHAsync_v2", ctypes.c_void_p(host), ctypes.c_uint64(pointer), ctypes.c_size_t(nbytes),
                   self.stream)
        self.synchronize()

    def synchronize(self) -> None:
        self.check("cuStreamSynchronize", self.stream)

    # -- kernels -----------------------------------------------------------------------------

    def load_function(self, cubin: bytes, name: str, shared: int) -> ctypes.c_void_p:
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        image = ctypes.create_string_buffer(cubin, len(cubin))
        self.check("cuModuleLoadData", ctypes.byref(module), image)
        self.check("cuModuleGetFunction", ctypes.byref(function), module, name.encode())
        if shared > 48 * 1024:
            self.check("cuFuncSetAttribute", function, FUNC_MAX_DYNAMIC_SHARED, shared)
        return function

    def launch(self, function, grid, threads: int, shared: int, params) -> None:
        """``params``: a ctypes array of void* pointing at each argument's value."""
        self.check("cuLaunchKernel", function, *[ctypes.c_uint(g) for g in grid], ctypes.c_uint(threads),
                   ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(shared), self.stream, params, None)

    # -- graphs ------------------------------------------------------------------------------

    def capture(self, launches) -> ctypes.c_void_p:
        """Record the kernels ``launches()`` enqueues as a CUDA graph, instantiated for replay."""
        graph, executable = ctypes.c_void_p(), ctypes.c_void_p()
        self.check("cuStreamBeginCapture_v2", self.stream, CAPTURE_MODE_THREAD_LOCAL)
        try:
            launches()
        finally:
            self.check("cuStreamEndCapture", self.stream, ctypes.byref(graph))
        self.check("cuGraphInstantiateWithFlags", ctypes.byref(executable), graph, ctypes.c_ulonglong(0))
        return executable

    def replay(self, executable) -> None:
        self.check("cuGraphLaunch", executable, self.stream)

    def destroy_graph(self, executable) -> None:
        self.check("cuGraphExecDestroy", executable)
