"""Datasets from their on-disk formats to FFCV .beton files, and batches back out.

- datasets: the dataset-kind registry and the readers of each kind's files.
- splits: prepared splits on disk (paths, manifests, completeness, Preprocess); no FFCV.
- prepare: sources -> one .beton and manifest per split.
- loaders: FFCV writing and loading, seeded train batches, eval batches.
- seeded: the seeded sampler and crops that make a train order reproducible.
- recipes: each dataset kind's paper recipe (views, resizing, probe grid); torch-free.
"""
