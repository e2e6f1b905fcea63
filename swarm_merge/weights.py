"""Build a particle's weights from the experts' tensors: ``sum_k a[g, k] E_k[t]``.

One arithmetic (:func:`combine`) for every evaluation mode, so they build
bit-identical weights: in-memory mode combines experts held in memory;
one-model and streaming modes read them chunk by chunk from their safetensors
files (:class:`TensorReader`) into a reused buffer (:class:`ChunkedCombiner`),
straight into the model's parameters (one-model) or through
:class:`LazyMergedWeights`, the weights map accelerate's offload hooks read
(streaming). :func:`scan_experts` reads every weight once before a search.
Built weights are checked finite in their dtype chunk by chunk while in cache
(:class:`FiniteCheck`), except where the experts' largest values prove them so
(:func:`may_overflow`); a particle that is not scores NaN (:class:`NonFiniteWeights`).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import struct
import threading
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from swarm_merge.errors import EvaluationError
from swarm_merge.experts import Expert

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["torch_dtype", "TensorReader", "PreadShard", "read_stacked", "combine", "coefficient_rows", "CHUNK",
           "build_workers", "run_chunks", "combine_chunked", "ChunkedCombiner", "LazyMergedWeights", "scan_experts",
           "NonFiniteWeights", "FiniteCheck", "is_finite", "row_peaks", "may_overflow", "check_range"]


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorReader:
    """Reads single tensors out of safetensors files with ``os.preadv``.

    Written by hand because safetensors' ``safe_open`` memory-maps each file:
    every page it touches stays mapped into the process and counts in its RSS,
    so streaming K experts through it would end with all K resident. pread
    copies only the bytes of the tensor asked for (one copy, straight into the
    caller's buffer) and leaves caching to the OS page cache.
    """

    def __init__(self) -> None:
        self._files: Dict[str, Tuple[int, int, dict]] = {}  # path -> (fd, data start, header)

    def _open(self, path: str):
        if path not in self._files:
            fd = os.open(path, os.O_RDONLY)
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, size, 8))
            self._files[path] = (fd, 8 + size, header)
        return self._files[path]

    def read_into(self, path: str, name: str, out: torch.Tensor, *, start: int = 0) -> torch.Tensor:
        """Fill ``out`` (a CPU tensor of the stored dtype) with tensor ``name``'s
        flattened elements from ``start`` on (as many as ``out`` holds)."""
        fd, data, header = self._open(path)
        begin, end = header[name]["data_offsets"]
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        offset = begin + start * out.element_size()
        if offset + len(view) > end:
            raise EvaluationError(f"{path}: tensor {name} is {end - begin} bytes, shorter than asked; re-save the expert")
        done = 0
        while done < len(view):  # preadv may return short reads on large tensors
            n = os.preadv(fd, [view[done:]], data + offset + done)
            if n <= 0:
                raise EvaluationError(f"{path}: truncated while reading {name}; re-download the expert")
            done += n
        return out

    def header(self, path: str) -> dict:
        """The file's tensor entries (name -> dtype, shape, data_offsets)."""
        return {k: v for k, v in self._open(path)[2].items() if k != "__metadata__"}

    def stored_dtype(self, path: str, name: str) -> torch.dtype:
        return _ST_DTYPES[self._open(path)[2][name]["dtype"]]

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


class PreadShard:
    """One safetensors file with the interface mergekit's loaders use (``keys``,
    ``get_tensor``), read through :class:`TensorReader` instead of a memory map.

    mergekit opens each expert's shard with ``safe_open`` (a memory map) and
    keeps it open while it merges, so by the end of a write every expert's
    weights are mapped into the process (2.2 GB file-backed RSS for the demo's
    four 135M experts); mergekit has no option to read otherwise, hence this.
    ``get_tensor`` returns a fresh tensor freed once mergekit is done with it.
    """

    def __init__(self, path: str, reader: TensorReader):
        self.path = path
        self.reader = reader
        self.header = reader.header(path)

    def keys(self):
        return self.header.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self.header[key]
        out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        self.reader.read_into(self.path, key, out.view(-1))
        return out


def read_stacked(reader: TensorReader, experts: Sequence[Expert], name: str, dtype: torch.dtype,
                 scratch: Optional[torch.Tensor] = None, span: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The K experts' tensor ``name`` as one ``(K, numel)`` tensor of ``dtype`` (CPU).

    With ``scratch`` (a flat buffer of at least K * numel elements of ``dtype``)
    the result is a view of it: no fresh allocation, hence no page faults.
    """
    infos = [e.tensors[name] for e in experts]
    stored = {reader.stored_dtype(i.file, name) for i in infos}
    start, stop = span or (0, infos[0].numel)
    numel = stop - start
    if scratch is not None:
        stacked = scratch[: len(infos) * numel].view(len(infos), numel)
    else:
        stacked = torch.empty((len(infos), numel), dtype=dtype)
    if stored == {dtype}:
        for k, info in enumerate(infos):
            reader.read_into(info.file, name, stacked[k], start=start)
        return stacked
    for k, info in enumerate(infos):
        raw = torch.empty(numel, dtype=reader.stored_dtype(info.file, name))
        stacked[k].copy_(reader.read_into(info.file, name, raw, start=start))
    return stacked


@torch.no_grad()
def combine(stacked: torch.Tensor, c: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_k c[k] * stacked[k]``, accumulated in float32, into ``out`` or a new tensor
    (never into ``stacked``, which may be a reused scratch buffer).

    Both evaluation modes build every weight with this one function, so they
    give bit-identical weights. Coefficients are float32: in a 16-bit dtype a
    coefficient like 0.3456 would round to 3 significant digits.
    """
    if stacked.dtype == torch.float32:
        # One (1, K) x (K, N) product: a single pass over the experts' memory.
        if out is not None and out.dtype == torch.float32:
            torch.matmul(c.unsqueeze(0), stacked, out=out.view(1, -1))
            return out
        result = torch.matmul(c.unsqueeze(0), stacked).view(-1)
    elif out is not None and stacked.is_cuda and _fused_combine(stacked, c, out):
        return out
    else:
        # 16-bit experts: float32 accumulation, term by term as mergekit's linear method does it
        # (addcmul into a float32 result), so the weights searched are the weights it writes. c[k]
        # stays a tensor on c's device: float(c[k]) would wait for the GPU K times per chunk.
        result = torch.zeros(stacked.shape[1], dtype=torch.float32, device=stacked.device)
        for k in range(stacked.shape[0]):
            result.addcmul_(stacked[k], c[k])
    if out is not None:
        return out.copy_(result)
    return result


@functools.cache
def _fused_kernel():
    """The K-term combine as one Triton kernel: each element is read once per expert and written
    once, where the addcmul chain above moves the float32 accumulator through memory K + 2 times
    (1B parameters, K = 4, an H200: 28 ms a build). Written by hand because torch has no fused
    "weighted sum of K 16-bit rows in float32"; the arithmetic is the addcmul chain's (a fused
    multiply-add per term in float32, in the experts' order), so both give the same bits."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(x_ptr, c_ptr, out_ptr, n, stride_k, K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            x = tl.load(x_ptr + k * stride_k + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.fma(x, tl.load(c_ptr + k), acc)  # as torch's addcmul: one rounding per term
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return kernel, triton.cdiv


FUSED_BLOCK = 4096


def _fused_combine(stacked: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> bool:
    """:func:`combine` of 16-bit rows into ``out`` with the Triton kernel; False where it cannot
    (no Triton, or a layout it does not take), and the caller combines as before."""
    made = _fused_kernel()
    if made is None or stacked.dim() != 2 or stacked.stride(1) != 1 or not out.is_contiguous() \
            or c.device != stacked.device or out.device != stacked.device:
        return False
    kernel, cdiv = made
    n = stacked.shape[1]
    if n:
        kernel[(cdiv(n, FUSED_BLOCK),)](stacked, c.to(torch.float32).contiguous(), out.view(-1), n, stacked.stride(0),
                                        K=stacked.shape[0], BLOCK=FUSED_BLOCK, num_warps=8)
    return True


def coefficient_rows(coefficients: np.ndarray, device) -> List[torch.Tensor]:
    coefficients = np.asarray(coefficients, dtype=np.float64)
    return [torch.tensor(row, dtype=torch.float32, device=device) for row in coefficients]


CHUNK = 256 * 1024
"""Elements a build handles at a time (1 MiB per expert in float32): small enough that the K chunks
just read are still in cache when they are combined. On the demo's experts (2 CPU cores, 32 MiB L3)
a one-model rebuild took 0.56 s with 4 Mi-element chunks and 0.45 s with these (one thread)."""

MAX_WORKERS = 8
"""Build threads on the CPU (at most; no more than torch's threads): past a few, the memory
bandwidth, not the cores, is the limit."""

_POOLS: Dict[int, "ThreadPoolExecutor"] = {}
# torch's thread count is process-wide: one build at a time sets it to 1 and restores it.
_BUILD_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has the pools but not their threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def build_workers(device: torch.device) -> int:
    """Threads a build runs on: torch's threads on the CPU (capped), one elsewhere."""
    return max(1, min(MAX_WORKERS, torch.get_num_threads())) if device.type == "cpu" else 1


def run_chunks(tasks: Sequence[Callable[[], None]], workers: int) -> None:
    """Run ``tasks`` (independent chunks of a build) on ``workers`` threads.

    Written by hand because torch parallelises one op at a time: a build is
    ~1000 small ops, and a single core copies the page cache (one-model) at
    about 12 GB/s, well under the memory's bandwidth. Threads each take whole
    chunks (pread and the combine release the GIL) while torch runs
    single-threaded, so the cores are not oversubscribed. Each chunk is the
    same arithmetic as on one thread, so the weights are bit-identical.
    Grad and inference modes are per thread: the workers take the caller's
    (streaming builds inside the forward's inference mode). Builds from
    several threads run one at a time (torch's thread count is process-wide);
    torch work on other threads runs single-threaded while one does.
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    from concurrent.futures import ThreadPoolExecutor, wait

    inference = torch.is_inference_mode_enabled()
    with _BUILD_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="swarm-merge-build")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            futures = [pool.submit(_in_mode, inference, task) for task in tasks]
            wait(futures)  # all of them, even after a failure: none is left writing into the model
            for future in futures:
                future.result()
        finally:
            torch.set_num_threads(threads)


def _in_mode(inference: bool, task: Callable[[], None]) -> None:
    with torch.inference_mode(inference), torch.no_grad():
        task()


class NonFiniteWeights(EvaluationError):
    """A particle's merged weights hold NaN or inf in the dtype they are built in (its
    coefficients overflow it): the particle scores NaN, as any failed evaluation, and the
    search goes on."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        super().__init__(f"the merged tensor {name!r} is not finite in {dtype_name(dtype)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t`` (floating point). Its float32 sum is finite unless it holds one,
    or sums past float32's range, which an exact check then tells apart: on 256 Ki float32
    elements in cache (a build chunk) the sum takes 0.04 ms, torch.isfinite(t).all() 1.1 ms."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


class FiniteCheck:
    """Which tensor of a build came out NaN or inf, checked chunk by chunk as it is built.

    On the CPU each chunk is checked while it is still in cache (:func:`is_finite`). On a
    GPU the flags stay on the device, one running flag per tensor name, and are read once
    by :meth:`first`: a read per chunk would wait for each copy and stall the pipeline.
    """

    def __init__(self) -> None:
        self.bad: Optional[str] = None
        self._flags: Dict[str, torch.Tensor] = {}

    def add(self, name: str, out: torch.Tensor) -> None:
        if not out.is_floating_point():
            return
        if out.device.type == "cpu":
            if self.bad is None and not is_finite(out):
                self.bad = name  # threads may race here: any one bad name will do
            return
        flag = torch.isfinite(out).all()
        self._flags[name] = flag if name not in self._flags else self._flags[name] & flag

    def first(self) -> Optional[str]:
        """The first tensor found not finite since the last call (None: all finite); starts over."""
        bad, self.bad = self.bad, None
        if self._flags:
            names = list(self._flags)
            ok = torch.stack([self._flags[n] for n in names]).cpu()
            self._flags.clear()
            if bad is None and not bool(ok.all()):
                bad = names[int((~ok).nonzero()[0])]
        return bad


def row_peaks(stacked: torch.Tensor) -> np.ndarray:
    """Each row's largest absolute value, ``(K,)`` float64 (for :func:`may_overflow`). amax and
    amin, not aminmax: with ``dim`` torch 2.13's aminmax takes 25x as long on a (4, 256 Ki) chunk."""
    return torch.maximum(stacked.amax(dim=1), -stacked.amin(dim=1)).double().cpu().numpy()


def may_overflow(peaks: Dict[str, np.ndarray], coefficients: np.ndarray, groups: Dict[str, int],
                 dtype: torch.dtype) -> set:
    """The tensors a particle might build NaN or inf in, of those whose ``peaks`` (each expert's
    largest |value| in ``dtype``, :func:`row_peaks`) are known: where ``sum_k |a_k| max|E_k|``
    passes half of ``dtype``'s largest value. The others cannot: every element is at most that
    sum (finite experts, float32 accumulation), so their chunks skip the check. With float32
    or bfloat16 that is every tensor of any sane merge; with float16, all but those whose
    values come near 65504 (the demo's experts peak at 9.25)."""
    a = np.abs(np.asarray(coefficients, dtype=np.float64))
    limit = 0.5 * torch.finfo(dtype).max
    return {name for name, peak in peaks.items() if not float(a[groups[name]] @ peak) <= limit}  # NaN: check


def _combine_checked(stacked: torch.Tensor, c: torch.Tensor, out: torch.Tensor, name: Optional[str],
                     check: FiniteCheck) -> None:
    combine(stacked, c, out=out)
    if name is not None:
        check.add(name, out)


def combine_chunked(items: Sequence[Tuple[Optional[str], torch.Tensor, torch.Tensor, torch.Tensor]],
                    workers: int) -> None:
    """:func:`combine` for each ``(name, stacked (K, N), c, out (N,))`` held in memory, in
    chunks of :data:`CHUNK` columns shared among ``workers`` threads. Each chunk is checked
    finite as it is built (name None: not checked); one that is not raises
    :class:`NonFiniteWeights` once all are built."""
    check = FiniteCheck()
    run_chunks([partial(_combine_checked, stacked[:, start:start + CHUNK], c, out[start:start + CHUNK], name, check)
                for name, stacked, c, out in items for start in range(0, out.numel(), CHUNK)], workers)
    bad = check.first()
    if bad is not None:
        raise NonFiniteWeights(bad, items[0][3].dtype)


class ChunkedCombiner:
    """Builds tensors from the experts' files: K chunks read into a reused
    buffer, combined straight into the destination.

    Memory: ``K * chunk`` elements of buffer per worker (two on CUDA, in
    pinned host memory), whatever the model size. Reading into fresh memory
    every time would cost page faults worth more than the read; chunking keeps
    the buffer small next to the largest tensor (the embeddings). Each output
    element is the same K-term combination :func:`combine` computes on whole
    tensors, so every mode builds the same weights.

    On the CPU the chunks are shared among :func:`build_workers` threads
    (:func:`run_chunks`), each with its own buffer. On CUDA they go through two
    pinned buffers in turn, so reading the next chunk overlaps the copy of the
    last one to the GPU, and a buffer is refilled only once its copy is done.
    """

    def __init__(self, experts: Sequence[Expert], *, dtype: torch.dtype, device: torch.device,
                 workers: Optional[int] = None):
        self.experts = list(experts)
        self.dtype = dtype
        self.device = device
        self.reader = TensorReader()
        self.bytes_read = 0  # expert bytes read so far (for tests and the benchmark)
        self._counting = threading.Lock()
        self.chunk = min(CHUNK, max(t.numel for t in experts[0].tensors.values()))
        cuda = device.type == "cuda"
        self.workers = (workers or build_workers(device)) if device.type == "cpu" else 1
        buffers = 2 if cuda else self.workers
        self.scratch = [torch.empty(len(self.experts) * self.chunk, dtype=dtype, pin_memory=cuda)
                        for _ in range(buffers)]
        self._copied = [None] * buffers  # CUDA: the event marking each pinned buffer's copy done
        self._free: "queue.SimpleQueue[torch.Tensor]" = queue.SimpleQueue()
        for buffer in self.scratch:
            self._free.put(buffer)
        for path in {info.file for expert in self.experts for info in expert.tensors.values()}:
            self.reader.header(path)  # open every file now: the threads then only read
        # Every chunk built is checked finite (in ``dtype``) but those of the tensors in ``skip``
        # (which the caller knows cannot overflow: may_overflow); callers read it with check.first().
        self.check = FiniteCheck()
        self.skip: set = set()
        # Each expert's largest |value| per tensor (in ``dtype``), learnt from the chunks the first
        # build of the tensor reads: no read of its own.
        self.peaks: Dict[str, np.ndarray] = {}
        # The running maximum per tensor, updated in place: a small array kept per chunk would sit
        # between the chunks' freed buffers and fragment the heap (the first build of 1B bfloat16
        # experts grew the process by 2.2 to 4.4 GB, run to run).
        self._learnt: Dict[str, np.ndarray] = {}

    def combine_into(self, name: str, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (flat, on the device) = ``sum_k c[k] * E_k[name]``."""
        self.combine_all([(name, c, out)])
        return out

    def combine_all(self, items: Sequence[Tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """:meth:`combine_into` for each ``(name, c, out)``; on the CPU the chunks of all of
        them are shared among the workers."""
        spans = [(name, c, out, start, min(start + self.chunk, out.numel()))
                 for name, c, out in items for start in range(0, out.numel(), self.chunk)]
        try:
            if self.device.type == "cpu":
                run_chunks([partial(self._cpu_span, *span) for span in spans], self.workers)
            else:
                for i, span in enumerate(spans):
                    self._device_span(*span, buffer=i % len(self.scratch))
        finally:
            learnt, self._learnt = self._learnt, {}
        self.peaks.update(learnt)  # a complete build: every chunk of these was read

    def _read(self, name: str, scratch: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        stacked = read_stacked(self.reader, self.experts, name, self.dtype, scratch=scratch, span=(start, stop))
        peak = row_peaks(stacked) if name not in self.peaks else None
        with self._counting:
            self.bytes_read += stacked.numel() * stacked.element_size()
            if peak is not None:
                seen = self._learnt.get(name)
                if seen is None:
                    self._learnt[name] = peak
                else:
                    np.maximum(seen, peak, out=seen)
        return stacked

    def _cpu_span(self, name, c, out, start, stop) -> None:
        scratch = self._free.get()  # one buffer per worker: never waits
        try:
            combine(self._read(name, scratch, start, stop), c, out=out[start:stop])
        finally:
            self._free.put(scratch)
        if name not in self.skip:
            self.check.add(name, out[start:stop])

    def _device_span(self, name, c, out, start, stop, *, buffer: int) -> None:
        if self._copied[buffer] is not None:
            self._copied[buffer].synchronize()  # its last copy to the device is done: safe to refill
        cuda = self.device.type == "cuda"
        # non_blocking only from pinned memory on CUDA, where the event below guards the buffer
        stacked = self._read(name, self.scratch[buffer], start, stop).to(self.device, non_blocking=cuda)
        if cuda:
            self._copied[buffer] = torch.cuda.Event()
            self._copied[buffer].record(torch.cuda.current_stream(self.device))
        combine(stacked, c, out=out[start:stop])
        if name not in self.skip:
            self.check.add(name, out[start:stop])

    def close(self) -> None:
        self.reader.close()


class LazyMergedWeights(Mapping):
    """A weights map whose values are built on access: ``sum_k a[g, k] E_k[name]``.

    accelerate's offload hooks read each module's tensors from it right before
    the module's forward and drop them right after, so at any time the process
    holds one module's weights plus K chunks (per build thread) of the tensor being combined.
    """

    def __init__(self, experts: Sequence[Expert], groups: Dict[str, int], aliases: Dict[str, str], *,
                 dtype: torch.dtype, device: torch.device, tied: Optional[set] = None):
        self.experts = list(experts)
        self.groups = groups
        self.aliases = aliases  # a parameter name the files do not store -> the stored name
        self.names = [n for n in experts[0].tensors] + [a for a in aliases if a not in experts[0].tensors]
        self.dtype = dtype
        self.device = device
        self.combiner = ChunkedCombiner(experts, dtype=dtype, device=device)
        self.rows: Optional[List[torch.Tensor]] = None
        self.coefficients: Optional[np.ndarray] = None
        # Tied weights (embeddings = head) are asked for twice per forward; the
        # second ask reuses the first build (until the coefficients change).
        self.tied_sources = set(aliases.values()) if tied is None else set(tied)
        self._tied: Dict[str, torch.Tensor] = {}

    @property
    def bytes_read(self) -> int:
        return self.combiner.bytes_read

    def set_coefficients(self, coefficients: np.ndarray) -> None:
        self.rows = coefficient_rows(coefficients, self.device)
        self.coefficients = coefficients
        self._tied.clear()
        self.combiner.check.first()  # forget the last particle's
        self._skip_safe()

    def nonfinite(self) -> Optional[str]:
        """The first tensor built since the last call (or set_coefficients) that was not finite, or None.

        Read after the forwards: raising inside accelerate's hooks would leave them half done
        (tied weights cached under a pointer, a module's weights on the device)."""
        self._skip_safe()  # the peaks learnt meanwhile (LoRA: the coefficients are set once)
        return self.combiner.check.first()

    def _skip_safe(self) -> None:
        peaks = self.combiner.peaks
        if self.coefficients is not None:
            self.combiner.skip = set(peaks) - may_overflow(peaks, self.coefficients, self.groups, self.dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self.aliases.get(name, name)
        if source not in self.groups:
            raise KeyError(name)
        if self.rows is None:
            raise EvaluationError("no particle set: call set_coefficients first")
        if source in self._tied:
            return self._tied[source]
        info = self.experts[0].tensors[source]
        merged = torch.empty(info.numel, dtype=torch.float32 if self.dtype == torch.float32 else self.dtype,
                             device=self.device)
        self.combiner.combine_into(source, self.rows[self.groups[source]], merged)
        merged = merged.reshape(info.shape)
        if source in self.tied_sources:
            self._tied[source] = merged
        return merged

    def __contains__(self, name: object) -> bool:  # cheap: never builds a tensor
        return name in self.groups or name in self.aliases

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def scan_experts(experts: Sequence[Expert], *, chunk_bytes: int = 64 * 1024 * 1024) -> List[str]:
    """Read every expert's weights once: refuse non-finite values, and return a
    digest of each expert's bytes (the checkpoint's fingerprint covers content,
    so a resume after an expert changed in place is refused).

    A NaN or inf anywhere in an expert poisons every merge (0 * NaN is NaN), so
    it is bad input, found here before the search rather than as a swarm of
    NaN utilities. Reads with :class:`TensorReader` (no mmap: RSS stays flat).

    Raises:
        ExpertError: a tensor holds NaN or inf.
    """
    import hashlib

    from swarm_merge.errors import ExpertError

    reader = TensorReader()
    digests = []
    try:
        for expert in experts:
            h = hashlib.blake2b(digest_size=20)
            for name in sorted(expert.tensors):
                info = expert.tensors[name]
                dtype = reader.stored_dtype(info.file, name)
                h.update(f"{name}:{info.dtype}:{list(info.shape)};".encode())
                step = max(1, chunk_bytes // torch.tensor([], dtype=dtype).element_size())
                buf = torch.empty(min(step, max(info.numel, 1)), dtype=dtype)
                for start in range(0, info.numel, step):
                    part = reader.read_into(info.file, name, buf[: min(step, info.numel - start)], start=start)
                    h.update(memoryview(part.view(torch.uint8).numpy()))
                    if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                        raise ExpertError(
                            f"expert {expert.describe()}: tensor {name!r} holds NaN or inf values, which make every "
                            "merge NaN (even at coefficient 0); repair or re-save that expert"
                        )
            digests.append(h.hexdigest())
    finally:
        reader.close()
    return digests


def check_range(experts: Sequence[Expert], dtype: torch.dtype, *, what: str = "expert") -> None:
    """Refuse an expert whose values ``dtype`` cannot hold: float32 or bfloat16 weights past
    float16's 65504 become inf when converted, and then so is every merge (0 * inf is NaN).

    Bad input, found before the search. Only tensors stored in a dtype of a wider range
    than ``dtype`` can overflow (:func:`scan_experts` refused NaN and inf as stored), so
    nothing is read unless the recipe narrows the range (float16 over float32 or bfloat16
    experts): then each such tensor once, in chunks.

    Raises:
        ExpertError: naming the expert, the tensor and the fix.
    """
    from swarm_merge.errors import ExpertError

    limit = torch.finfo(dtype).max
    step = 16 * CHUNK
    reader = TensorReader()
    try:
        for name in experts[0].tensors:
            for expert in experts:
                info = expert.tensors[name]
                stored = _ST_DTYPES[info.dtype]
                if not stored.is_floating_point or torch.finfo(stored).max <= limit:
                    continue
                buf = torch.empty(min(step, max(info.numel, 1)), dtype=stored)
                peak = 0.0
                for start in range(0, info.numel, step):
                    low, high = torch.aminmax(reader.read_into(info.file, name, buf[: min(step, info.numel - start)],
                                                               start=start))
                    peak = max(peak, float(high), -float(low))
                # Rounding is monotonic: every value converts to a finite one iff the largest does.
                if not bool(torch.isfinite(torch.tensor(peak, dtype=torch.float64).to(dtype))):
                    raise ExpertError(
                        f"{what} {expert.describe()}: tensor {name!r} holds values up to {peak:.4g}, past "
                        f"{dtype_name(dtype)}'s range ({limit:g}): they become inf, and so would every merge; set "
                        "the recipe's dtype to bfloat16 or float32")
    finally:
        reader.close()
