"""Several processes, one search: each iteration's evaluations spread over the
processes accelerate (or torchrun) started, on one machine or many.

Every rank runs the same optimiser from the same seed. The positions to score
are split round-robin, each rank scores its share, and the scores are gathered
to every rank (``accelerate.utils.gather_object``), so every rank holds the
same memo and applies the same update: the result equals one process's.
Only the main rank writes (checkpoint, output, push); on ``--resume`` it reads
the checkpoint and broadcasts it, so other machines need no shared folder.

With one process (no ``WORLD_SIZE`` > 1 in the environment) every method is
a plain loop and nothing of torch.distributed is touched.

A rank that dies takes the run down: the launcher (torch elastic, under
``accelerate launch``) stops the others, which exit non-zero, and the output
folder is only ever published whole by the main rank at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["Ranks", "current", "launch_command", "device_for"]


class _Failed:
    """A rank's evaluation raised: carried through the gather so every rank raises it."""

    def __init__(self, exc: BaseException):
        self.type = type(exc).__name__
        self.message = str(exc)
        self.input_error = _is_input_error(exc)


def _is_input_error(exc: BaseException) -> bool:
    from swarm_merge.errors import InputError

    return isinstance(exc, InputError)


class Ranks:
    """The processes of this run (``world`` of them; this one is ``rank``)."""

    def __init__(self, state=None):
        self._state = state
        self.world = state.num_processes if state is not None else 1
        self.rank = state.process_index if state is not None else 0
        self.local_rank = state.local_process_index if state is not None else 0
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) if state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            on_done: Optional[Callable[[int, Any], None]] = None) -> List[Any]:
        """``[fn(x) for x in items]``, the items split round-robin over the ranks, the
        results gathered to every rank in order. ``on_done(i, result)`` runs on every
        rank for every item: after each item with one process, after the gather with
        several. An exception on any rank is raised on every rank (as the same type
        of error where it is one of ours, else an EvaluationError naming it)."""
        if not self.distributed:
            out = []
            for i, x in enumerate(items):
                out.append(fn(x))
                if on_done is not None:
                    on_done(i, out[-1])
            return out
        from accelerate.utils import gather_object

        mine = []
        for i in range(self.rank, len(items), self.world):
            try:
                mine.append((i, fn(items[i])))
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                mine.append((i, _Failed(exc)))
                break
        gathered = gather_object(mine)
        failed = [r for _, r in gathered if isinstance(r, _Failed)]
        if failed:
            from swarm_merge.errors import EvaluationError, InputError

            f = failed[0]
            cls = InputError if f.input_error else EvaluationError
            raise cls(f.message if f.input_error else f"an evaluation failed on another process: {f.type}: {f.message}")
        out: List[Any] = [None] * len(items)
        for i, r in gathered:
            out[i] = r
        if on_done is not None:
            for i, r in enumerate(out):
                on_done(i, r)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main rank's ``obj``, on every rank."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    @contextlib.contextmanager
    def local_main_first(self):
        """The body runs on each machine's first rank, then on the others (downloads)."""
        if not self.distributed:
            yield
            return
        with self._state.local_main_process_first():
            yield

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def device_for(device, ranks: Ranks, gpus: int):
    """The device this process evaluates on: with several processes on CUDA, the GPU of its
    local rank (one GPU per process on each machine; CUDA_VISIBLE_DEVICES picks which ones),
    else ``device`` as resolved. ``gpus``: the GPUs torch sees on this machine.

    Raises:
        InputError: more processes on this machine than GPUs, or a GPU index with several
            processes (each process takes its own).
    """
    import torch

    from swarm_merge.errors import InputError

    if not ranks.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise InputError(f"--device {device} with {ranks.world} processes: each process takes the GPU of its local "
                         "rank; pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if ranks.local_world > gpus:
        raise InputError(f"{ranks.local_world} processes on this machine but torch sees {gpus} GPU(s): one process "
                         f"per GPU; launch at most {gpus} (--num-processes {gpus})")
    return torch.device("cuda", ranks.local_rank)


_CURRENT: Optional[Ranks] = None


def current(device_type: str = "cpu") -> Ranks:
    """This process's view of the run: one rank, or the ranks a launcher started
    (``WORLD_SIZE`` > 1), joined through accelerate's PartialState (gloo on CPU)."""
    global _CURRENT
    if _CURRENT is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            _CURRENT = Ranks(PartialState(cpu=device_type == "cpu"))
        else:
            _CURRENT = Ranks()
    return _CURRENT


def reset() -> None:
    """Forget the current ranks (tests, and the end of a run)."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
    _CURRENT = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, argv: Sequence[str]) -> List[str]:
    """``accelerate launch`` of ``python -m swarm_merge ARGV`` on ``num_processes`` processes
    of this machine (torch elastic underneath, so it works on CPU with gloo too)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "swarm_merge", *argv]
