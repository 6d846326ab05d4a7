"""Shared pieces every stage uses and that import nothing else of timecat's pipeline.

- errors: TimecatError, the one error type users see.
- names: the naming rules of members, datasets and splits; members given as checkpoint files.
- files: atomic replaces, writability and destination checks for shared folders.
- progress: the one place for logging and progress bars.
- stats: bootstrap intervals, mean and sample std.
- memory: a process's own peak resident memory (recorded by every probe).
- distributed: rank, device and collectives under torchrun (one process otherwise).
- hints: how to call timecat here, and the `timecat extract` line for what is not cached yet.
"""
