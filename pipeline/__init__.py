"""timecat's pipeline: images -> .beton -> members -> feature cache -> probes -> reports.

Each folder is a room with one purpose; every import points down, and `make lint`
(import-linter, contracts in pyproject.toml) keeps it so:

    core <- configs <- data <- members <- train | features       (images and members)
    core <- configs <- probe <- report                           (features to numbers)
    experiments and options sit on both; cli.py on top; cache/ imports nothing of pipeline.
    The probe reads one table of the data room, data.recipes (torch-free): each kind's weight-decay grid.

- core/: errors, names, files, progress, stats, memory, distributed, hints.
- data/: datasets, splits, prepare, loaders, seeded, recipes.
- members/: models, checkpoints, torch_io, interop.
- train/: pretrain, plan.
- features/: extract, views.
- probe/: the probe stage, its protocols and solvers, the records file, predict.
- report/: tables and plots.
- experiments/: demo, toy, dominoes, diversity.
- configs: every stage's and experiment's frozen config, each field declared once.
- options: the command line's option types and options, built from the configs.
"""

__version__ = "0.1.0"
