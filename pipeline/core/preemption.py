"""A job's preemption signal, deferred to the training loop's next step boundary.

submitit requeues a job on SLURM's signal (SIGUSR2, sent before preemption or the time limit) from its
signal handler, which Python runs between two bytecodes of whatever the job is doing. A checkpoint
written there could catch the optimizer between two parameters' updates, and one not written loses
every step since the last periodic checkpoint. So a job ``arm``s this module: the signal is only noted,
and the training loop, at its next step boundary (``requested``), writes its checkpoint and then hands
the signal to the handler it deferred (``handle``: submitit's, which requeues the job and exits).
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

_armed: dict = {}  # signum -> the handler it deferred; noted: the signals received since
_noted: list[int] = []
NON_MAIN_WAIT_S = 600  # how long a rank other than 0 waits, after the hand-over, for the requeue to end it


def arm(signum: int) -> None:
    """Note ``signum`` from now on instead of running the handler in place, which ``handle`` runs later."""
    if signum not in _armed:
        _armed[signum] = signal.getsignal(signum)
    signal.signal(signum, lambda received, frame: _noted.append(received))


def disarm() -> None:
    """Put the deferred handlers back and forget what was noted (a job's end)."""
    for signum, handler in _armed.items():
        signal.signal(signum, handler)
    _armed.clear()
    _noted.clear()


def requested(device: torch.device | None = None) -> bool:
    """Whether a deferred signal reached this process, or any rank of the job: ranks agree, so all save at
    the same step (one all-reduce of a flag per step, only while armed and under torch.distributed)."""
    if not _armed:
        return False
    flag = bool(_noted)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = torch.tensor([int(flag)], device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        flag = bool(box.item())
    return flag


def handle(rank: int) -> None:
    """Run the deferred handler for the signal noted (submitit's requeues the job and exits on rank 0).

    submitit's handler returns on other ranks, without exiting, lest a task's exit end the job before rank 0
    requeues it; they wait here for the requeue to end them.
    """
    signum = _noted[0] if _noted else next(iter(_armed))
    handler = _armed[signum]
    if callable(handler):
        handler(signum, None)
    if rank != 0:
        time.sleep(NON_MAIN_WAIT_S)
    raise SystemExit(f"stopped at signal {signal.Signals(signum).name}; the job was not requeued")
