"""timecat's pipeline: images -> .beton -> members -> feature cache -> probes -> reports.

One module per stage (prepare, pretrain, extract, probe, report) over shared
pieces (datasets, loaders, models, checkpoints, results).
"""

__version__ = "0.1.0"
