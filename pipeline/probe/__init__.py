"""Probes fitted on cached features, and the records they write. Never imports data loaders,
members or extraction (`make lint`).

- run: the probe stage (reads the cache, runs a protocol's path from its registry, builds and saves the
  record).
- protocol: what a protocol takes (Inputs) and gives back (Measured).
- c_search: the C-search policy (which candidates, which stages, the tie rule), and the batched logreg path.
- batched_lbfgs: the batched, preconditioned per-problem L-BFGS solver.
- logreg_backends: the logreg protocol one C at a time (scikit-learn, torch, cuML).
- bn_linear: protocol bn-linear (formerly tc), the paper's BatchNorm + Linear head on cached features.
- knn: DINO's weighted k-NN, blocked over train rows.
- heldout: the held-out search split, few-shot draws, standardisation, top-k.
- results: the probe records file (append under a lock, load, select) and predictions.
- predict: a saved probe head applied to cached features.
"""
