"""CUDA graph conditional (IF) nodes inside a PyTorch stream capture.

PyTorch exposes them from 2.12 on (`CUDAGraph.begin_capture_to_if_node`); the GPU machines this
project runs on have 2.11, so a 40-line CUDA helper (eval/cuda/conditional_node.cu) does the same
through the CUDA runtime: it is compiled with the local nvcc on first use and cached under
~/.cache/sparsify/cuda. Work captured inside `if_gate(...)` becomes the body of an IF node and
runs on replay only when a skip gate, evaluated on the GPU by the kernel that sets the node's
condition, keeps a token; no host synchronisation is involved.

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

from sparsify.errors import SparsifyError

SOURCE = Path(__file__).parent / "cuda" / "conditional_node.cu"


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


def _library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + (torch.version.cuda or "").encode()).hexdigest()[:16]
    return Path(os.environ.get("SPARSIFY_CACHE", Path.home() / ".cache" / "sparsify")) / "cuda" / f"conditional_node-{digest}.so"


@cache
def _library() -> ctypes.CDLL:
    path = _library_path()
    if not path.exists():
        nvcc = _nvcc()
        if nvcc is None:
            raise SparsifyError("CUDA graph conditional nodes need nvcc (CUDA >= 12.4) to build a small helper; "
                                "set CUDA_HOME or use --decode-engine hf")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.so")
        major, minor = torch.cuda.get_device_capability()
        done = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared", f"-arch=sm_{major}{minor}",
                               "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SparsifyError(f"building the conditional-node helper failed:\n{done.stderr.strip()}")
        partial.replace(path)  # atomic: a half-built library never looks finished
    torch.cuda.init()  # the helper binds to the CUDA runtime torch already loaded
    library = ctypes.CDLL(str(path))
    for name in ("sparsify_begin_if_gate", "sparsify_end_if"):
        getattr(library, name).restype = ctypes.c_int
    library.sparsify_begin_if_gate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    library.sparsify_end_if.argtypes = [ctypes.c_void_p]
    return library


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class ConditionalCapture:
    """Adds IF nodes to the graph being captured on `capture_stream` (the current stream)."""

    def __init__(self, device: torch.device, capture_stream: torch.cuda.Stream):
        self.library = _library()
        self.device = device
        self.body_stream = torch.cuda.Stream(device)
        while self.body_stream.cuda_stream == capture_stream.cuda_stream:  # streams come from a round-robin pool
            self.body_stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.MemPool()

    @contextmanager
    def if_gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, logit_threshold: float) -> Iterator[None]:
        """Capture the block as the body of an IF node that runs when w . x + b > logit_threshold
        for any row of `x` (..., width); w and b fp32, evaluated on the GPU at every replay. The
        tensors must outlive the graph (they are read at replay)."""
        if not (x.is_contiguous() and weight.dtype == bias.dtype == torch.float32 and x.dtype in DTYPE_CODES):
            raise ValueError("the gate needs a contiguous float input and fp32 weight and bias")
        width = x.shape[-1]
        capturing = torch.cuda.current_stream(self.device)
        _check(self.library.sparsify_begin_if_gate(capturing.cuda_stream, x.data_ptr(), DTYPE_CODES[x.dtype], weight.data_ptr(),
                                                   bias.data_ptr(), logit_threshold, x.numel() // width, width,
                                                   self.body_stream.cuda_stream), "adding an IF node")
        try:
            with torch.cuda.stream(self.body_stream), torch.cuda.use_mem_pool(self.pool, self.device):
                yield
        finally:
            _check(self.library.sparsify_end_if(self.body_stream.cuda_stream), "ending the IF node's capture")
