"""Checkpoint tensors from their (memory-mapped) files straight to the device, in the target dtype.

A pickled checkpoint read with ``torch.load(mmap=True)`` gives CPU tensors whose pages are still on disk
(or in the page cache). Moving those one by one with ``.to(device)`` reads the file on one thread through
CUDA's pageable-copy path. On CUDA this copier instead copies several tensors at once, each through two
reusable pinned staging buffers per thread: while one chunk travels to the GPU on the thread's stream the
next one is read from the file, so disk reads, page faults and PCIe copies overlap. Each tensor is copied
once in the file's dtype and cast on the device (no CPU-side fp32 or fp16 copy of 14 GB), and the staged
bytes are the file's bytes: the result is exactly what ``.to(device).to(dtype)`` gives
(tests/engine/test_weight_copies.py). Measured by ``bench/load_weights.py``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from types import TracebackType

import torch

STAGING_BYTES = 16 << 20  # per buffer, two per thread: 256 MiB of pinned memory in all at 8 threads
THREADS = 8


class WeightCopier:
    """Places state-dict tensors on ``device`` in ``dtype`` (floating tensors only; others keep theirs).

    ``staged`` None means: staged on CUDA, plain ``.to`` elsewhere (a CPU target keeps memory-mapped
    tensors as they are when the dtype already matches, as before). Use as a context manager: the copy
    threads and their pinned buffers live until it exits.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, *, staged: bool | None = None,
                 threads: int = THREADS, staging_bytes: int | None = None) -> None:
        if device.type == "cuda" and device.index is None:  # the copy threads' current device is GPU 0
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = device, dtype
        self.staged = device.type == "cuda" if staged is None else staged
        self.threads, self.staging_bytes = threads, staging_bytes or STAGING_BYTES
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self.bytes_copied = 0
        self._lock = threading.Lock()

    def __enter__(self) -> WeightCopier:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """End the copy threads (their staging buffers go with them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            if self.device.type == "cuda":  # the staging buffers' pinned memory goes back to the system
                empty = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
                if empty is not None:
                    empty()

    def target_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if tensor.is_floating_point() else tensor.dtype

    def place(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor on the device in its target dtype, same keys."""
        if not self.staged:
            return {key: self._plain(value) for key, value in tensors.items()}
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="mgie-load")
        # Biggest first, so the last thread to finish is not left alone with the largest tensor.
        order = sorted(tensors, key=lambda key: -tensors[key].numel() * tensors[key].element_size())
        futures = {key: self._pool.submit(self._staged, tensors[key]) for key in order}
        return {key: futures[key].result() for key in tensors}

    def _plain(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(self.device).to(self.target_dtype(tensor))
        with self._lock:
            self.bytes_copied += tensor.numel() * tensor.element_size()
        return out

    def _buffers(self) -> tuple[list[torch.Tensor], torch.cuda.Stream | None, list]:
        local = self._local
        if not hasattr(local, "buffers"):
            cuda = self.device.type == "cuda"
            local.buffers = [torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
            local.stream = torch.cuda.Stream(self.device) if cuda else None
            local.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        return local.buffers, local.stream, local.events

    def _staged(self, src: torch.Tensor) -> torch.Tensor:
        if not src.is_contiguous() or src.device.type != "cpu":
            return self._plain(src)
        buffers, stream, events = self._buffers()
        dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        src_bytes, dst_bytes = src.reshape(-1).view(torch.uint8), dst.reshape(-1).view(torch.uint8)
        total = src_bytes.numel()
        for n, start in enumerate(range(0, total, self.staging_bytes)):
            buf, done = buffers[n % 2], events[n % 2]
            size = min(self.staging_bytes, total - start)
            if done is not None:
                done.synchronize()  # the chunk copied out of this buffer two rounds ago has left it
            buf[:size].copy_(src_bytes[start:start + size])  # reads the file: page faults happen here
            if stream is None:
                dst_bytes[start:start + size].copy_(buf[:size])
            else:
                with torch.cuda.stream(stream):
                    dst_bytes[start:start + size].copy_(buf[:size], non_blocking=True)
                    done.record(stream)
        target = self.target_dtype(src)
        if stream is not None:
            with torch.cuda.stream(stream):
                out = dst.to(target)
            stream.synchronize()  # the caller's stream may use it at once
        else:
            out = dst.to(target)
        with self._lock:
            self.bytes_copied += total
        return out
