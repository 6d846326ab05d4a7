"""A job's preemption signal, deferred to the training loop's next step boundary.

submitit requeues a job on SLURM's signal (SIGUSR2, sent before preemption or the time limit) from its
signal handler, which Python runs between two bytecodes of whatever the job is doing. A checkpoint
written there could catch the optimizer between two parameters' updates, and one not written loses
every step since the last periodic checkpoint. So a job ``arm``s this module: the signal is only noted,
and the training loop, at its next step boundary (``requested``), writes its checkpoint and then hands
the signal to the handler it deferred (``handle``: submitit's, which requeues the job and exits). After
its last step the loop ``release``s the signal: the final evaluation and save run as any job's would.

A probe sweep's job has no steps: its fit is simply redone when requeued. But its records must not be
cut in two, or the requeued job would append again those already appended. So the job ``protect``s its
signal, and the probe appends its records in one ``uncut`` block.
"""

from __future__ import annotations

import contextlib
import signal
import time

_armed: dict = {}  # signum -> the handler it deferred; noted: the signals received since
_noted: list[int] = []
_protected: list[int] = []  # signals that must not cut a block of appends (``uncut``)
_flags = None  # the gloo group ``requested`` all-reduces its flag over
NON_MAIN_WAIT_S = 600  # how long a rank other than 0 waits, after the hand-over, for the requeue to end it


def arm(signum: int) -> None:
    """Note ``signum`` from now on instead of running the handler in place, which ``handle`` runs later."""
    if signum not in _armed:
        _armed[signum] = signal.getsignal(signum)
    signal.signal(signum, lambda received, frame: _noted.append(received))


def disarm() -> None:
    """Put the deferred handlers back and forget what was noted or protected (a job's end)."""
    global _flags
    for signum, handler in _armed.items():
        signal.signal(signum, handler)
    _armed.clear()
    _noted.clear()
    _protected.clear()
    _flags = None  # its process group ends with the job's


def protect(signum: int) -> None:
    """From now on, ``signum`` (a job's preemption) waits for the end of every ``uncut`` block."""
    _protected.append(signum)


@contextlib.contextmanager
def uncut():
    """A block that a protected signal does not cut (a no-op outside a job that protects one).

    A signal arriving inside is held. If the block fails, the handler in place then gets it (submitit's
    requeues the job, which does the work again); if the block finishes, the work it saved is whole and the
    job returns, so the signal is dropped rather than the job requeued to append the same records again.
    """
    if not _protected:
        yield
        return
    held: list[int] = []
    handlers = {signum: signal.getsignal(signum) for signum in _protected}
    for signum in handlers:
        signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    except BaseException:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if held and callable(handlers[held[0]]):
            handlers[held[0]](held[0], None)
        raise
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def requested() -> bool:
    """Whether a deferred signal reached this process, or any rank of the job: ranks agree, so all save at
    the same step. Under torch.distributed, one all-reduce of a flag per step, on the CPU over gloo (a group
    of its own, made at the first call, which every rank makes at the same step), so the loop never waits
    for the GPU; nothing at all while not armed."""
    global _flags
    if not _armed:
        return False
    import torch  # here: the probe imports this module for ``uncut`` alone
    import torch.distributed as dist

    flag = bool(_noted)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if _flags is None:
            _flags = dist.new_group(backend="gloo")
        box = torch.tensor([int(flag)])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_flags)
        flag = bool(box.item())
    return flag


def release() -> None:
    """Stop deferring: the handlers in place again, and a signal noted but not handled handed on now (from
    here on, as before ``arm``, submitit requeues at once, from the last checkpoint)."""
    noted = list(_noted)
    for signum, handler in _armed.items():
        signal.signal(signum, handler)
    handlers = dict(_armed)
    _armed.clear()
    _noted.clear()
    if noted and callable(handlers[noted[0]]):
        handlers[noted[0]](noted[0], None)


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
