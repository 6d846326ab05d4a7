"""Work submitted as cluster jobs through submitit: a plan's members, an extraction.

- launch: the executors (SLURM, or processes of this machine), the jobs, their list and states.
"""
