"""CUDA kernels and graph conditional (IF) nodes for the decode engine
(sparsify/engine/graph_decode.py).

Two jobs, both in sparsify/engine/cuda/decode_kernels.cu, compiled with the local nvcc on first use
and cached under ~/.cache/sparsify/cuda (written atomically):

- `rms_norm`: transformers' RMSNorm in one kernel instead of eight. Decode of a small model is
  launch-latency bound, so this shortens every layer of a dense teacher and of a skip model alike.
- `norm_gate` + `if_node`: the same kernel also evaluates a skip gate on the row it normalised
  and sets a CUDA graph conditional handle; the gated sublayer, captured inside `if_node`, becomes
  the body of an IF node that runs on replay only when a token is kept. The gate costs no kernel
  of its own and no decision reaches the host. PyTorch exposes IF nodes from 2.12 on
  (`CUDAGraph.begin_capture_to_if_node`); the GPU machines this project runs on have 2.11, so the
  helper adds them through the CUDA runtime.

The body is captured on a second stream (CUDA requires it), and its temporaries come from a
private memory pool that lives as long as the captured graph (the owner keeps `pool`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import nn

from sparsify.errors import SparsifyError

SOURCE = Path(__file__).parent / "cuda" / "decode_kernels.cu"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FUNCTIONS = {  # name -> argument types after the stream
    "sparsify_rmsnorm": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
    "sparsify_rmsnorm_gate_mask": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p],
    "sparsify_rmsnorm_gate_capture": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulonglong)],
    "sparsify_begin_if": [ctypes.c_ulonglong, ctypes.c_void_p],
    "sparsify_end_if": [],
}


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def available() -> bool:
    """A GPU plus either nvcc (to build the helper) or a helper already built."""
    return torch.cuda.is_available() and (_nvcc() is not None or _library_path().exists())


@cache
def _nvcc_version() -> str:
    nvcc = _nvcc()
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""


def _library_path() -> Path:
    # A build is for one source, CUDA runtime, compiler and GPU architecture (-arch=sm_XY).
    major, minor = torch.cuda.get_device_capability()
    key = SOURCE.read_bytes() + f"{torch.version.cuda}|sm_{major}{minor}|{_nvcc_version()}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return Path(os.environ.get("SPARSIFY_CACHE", Path.home() / ".cache" / "sparsify")) / "cuda" / f"decode_kernels-{digest}.so"


@cache
def _library() -> ctypes.CDLL:
    path = _library_path()
    if not path.exists():
        nvcc = _nvcc()
        if nvcc is None:
            raise SparsifyError("the decode engine's CUDA kernels need nvcc (CUDA >= 12.4) to build; "
                                "set CUDA_HOME or use --decode-engine hf")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        major, minor = torch.cuda.get_device_capability()
        done = subprocess.run([nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared", f"-arch=sm_{major}{minor}",
                               "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise SparsifyError(f"building the decode engine's CUDA kernels failed:\n{done.stderr.strip()}")
        partial.replace(path)  # atomic: a half-built library never looks finished
    torch.cuda.init()  # the helper binds to the CUDA runtime torch already loaded
    library = ctypes.CDLL(str(path))
    for name, arguments in _FUNCTIONS.items():
        function = getattr(library, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, *arguments]
    return library


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")


def fusable_norm(norm: nn.Module, dtype: torch.dtype) -> bool:
    """transformers' RMSNorm (Llama, Mistral, Qwen2, Qwen3: weight * normalise(x), no offset) with
    its weight in the activations' dtype, which is what the kernel reads."""
    weight = getattr(norm, "weight", None)
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and weight is not None \
        and weight.dtype == dtype and dtype in DTYPE_CODES and "Gemma" not in type(norm).__name__


class DecodeKernels:
    """The kernels, bound to one device; `capture_stream` is the stream graphs are captured on."""

    def __init__(self, device: torch.device, capture_stream: torch.cuda.Stream):
        self.library = _library()
        self.device = device
        self.body_stream = torch.cuda.Stream(device)
        while self.body_stream.cuda_stream == capture_stream.cuda_stream:  # streams come from a round-robin pool
            self.body_stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.MemPool()

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def rms_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        _check(self.library.sparsify_rmsnorm(self._stream(), DTYPE_CODES[x.dtype], x.data_ptr(), norm.weight.data_ptr(),
                                             norm.variance_epsilon, out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1]),
               "RMSNorm kernel")
        return out

    def norm_gate(self, norm: nn.Module, x: torch.Tensor, gate: nn.Module, mask: torch.Tensor | None,
                  scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, int | None]:
        """RMSNorm of `x` plus the gate's decision on it: writes `mask` (per row, 0/1 in x's dtype;
        None at batch 1) and, with `scratch` (two zeroed int32 that outlive the graph) during a
        capture, sets a new conditional handle, returned for `if_node`."""
        if not (x.is_contiguous() and gate.weight.dtype == gate.bias.dtype == torch.float32):
            raise ValueError("the gate needs a contiguous input and fp32 weight and bias")
        out = torch.empty_like(x)
        rows, width = x.numel() // x.shape[-1], x.shape[-1]
        common = (self._stream(), DTYPE_CODES[x.dtype], x.data_ptr(), norm.weight.data_ptr(), norm.variance_epsilon,
                  out.data_ptr(), rows, width, gate.weight.data_ptr(), gate.bias.data_ptr(), gate.logit_threshold,
                  mask.data_ptr() if mask is not None else None)
        if scratch is None:
            _check(self.library.sparsify_rmsnorm_gate_mask(*common), "RMSNorm + gate kernel")
            return out, None
        handle = ctypes.c_ulonglong(0)
        _check(self.library.sparsify_rmsnorm_gate_capture(*common, scratch.data_ptr(), ctypes.byref(handle)),
               "RMSNorm + gate kernel with a conditional handle")
        return out, handle.value

    @contextmanager
    def if_node(self, handle: int) -> Iterator[None]:
        """Capture the block as the body of an IF node on `handle`, placed after everything
        captured so far on the current stream."""
        _check(self.library.sparsify_begin_if(self._stream(), handle, self.body_stream.cuda_stream), "adding an IF node")
        try:
            with torch.cuda.stream(self.body_stream), torch.cuda.use_mem_pool(self.pool, self.device):
                yield
        finally:
            _check(self.library.sparsify_end_if(self.body_stream.cuda_stream), "ending the IF node's capture")
