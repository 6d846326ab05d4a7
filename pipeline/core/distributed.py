"""One process or many under torchrun: rank, device and the few collectives stages need.

torchrun (torch.distributed.run) starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; a plain ``python`` process is world size 1
and never touches torch.distributed. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.core.errors import TimecatError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created: bool = False  # whether init() started the process group (and so shutdown() ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes metadata, logs and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op in a single process)."""
        if self.world_size > 1:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable objects only)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects; tensors on the CPU)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init() -> Dist:
    """Join the torchrun job this process belongs to, or describe a single process.

    Each rank takes the GPU of its local rank when GPUs are present.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    created = world_size > 1 and not dist.is_initialized()
    if created:
        # A rank can wait at a collective while another finishes a long batch or refit; torch's
        # NCCL default (10 minutes) would abort such a job. TIMECAT_DIST_TIMEOUT_MIN sets it.
        minutes = float(os.environ.get("TIMECAT_DIST_TIMEOUT_MIN", "180"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=minutes))
    return Dist(rank, world_size, local_rank, device, created)


def shutdown(d: Dist) -> None:
    """Leave the process group (torch warns at exit if it is still open)."""
    if d.world_size > 1 and d.created and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc_per_node: int, command: list[str]) -> None:
    """Run ``command`` as ``nproc_per_node`` processes on this machine through torch's elastic launcher.

    The same as ``torchrun --standalone --nproc-per-node K --no-python COMMAND``;
    multi-node jobs call torchrun themselves (README). A failed worker raises
    torch's ChildFailedError, which names the rank and its error.
    """
    from torch.distributed.run import main as torchrun

    if nproc_per_node < 1:
        raise TimecatError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    torchrun(["--standalone", f"--nproc-per-node={nproc_per_node}", "--no-python", *command])


def use_threads(threads: int | None) -> int:
    """Set torch's CPU intra-op threads (``None``: every CPU this process may use); return the count.

    An explicit setting, recorded with what it produced: on a CPU, the thread count
    changes the order of reductions in convolutions, and so the weights' last bits.
    Under torchrun the CPUs are shared by the ranks on a node.
    """
    if threads is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, available // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads < 1:
        raise TimecatError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
