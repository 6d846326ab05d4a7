"""timecat's pipeline: images -> .beton -> members -> feature cache -> probes -> reports.

The stages, each of which imports shared pieces and never another stage:

- prepare: dataset sources -> .beton files and manifests, one per split.
- pretrain: one member (or a plan's) trained from its .beton, with resumable checkpoints.
- extract: frozen members' penultimate features -> the Zarr cache (``cache``).
- probe: logistic-regression, k-NN and the paper's head on cached features -> result records.
- report: records -> the paper's tables, plots and paired comparisons.
- predict: a probe's saved head applied to cached features of its members (``timecat predict``).

Shared pieces:

- configs: every stage's and experiment's frozen config, each field's default, unit and help declared once.
- options: the command line's option types and options, built from the configs.
- names: the naming rules of members, datasets and splits; members given as checkpoint files.
- splits: the prepared splits on disk (paths, manifests, completeness, Preprocess); no FFCV.
- datasets: the dataset-kind registry and readers of their on-disk formats.
- loaders: FFCV writing and loading (.beton), seeded train batches, eval batches.
- seeded: the seeded sampler and crops that make a train order reproducible.
- views: seeded augmented views of train images for the cached-views protocol.
- models: the architecture registry (small-resnet, the resnet50 family).
- checkpoints: the run folder, checkpoint files and their atomic writes, and finding any member (a run or a
  foreign file) to load.
- interop: foreign checkpoints (the paper's, AlgoPerf's, torchvision's) in and out.
- torch_io: weights-only reads, writes that report a full disk, strict state loads.
- recipes: the paper's probe recipe per dataset kind, and where timecat departs from it.
- distributed: rank, device and collectives under torchrun (one process otherwise).
- plan: fixed-compute experiment plans (CatN members, the paper's seeds) and their status.
- heldout: the held-out search split, few-shot draws, standardisation, the tie rule.
- logreg_solvers: one-C-at-a-time logistic regression (scikit-learn, torch, cuML).
- batched_logreg: the batched, preconditioned per-problem L-BFGS behind the default probe, each fit to its
  optimum.
- batched_probe: every C candidate and subset on the batched solver, under a memory budget.
- bn_linear_head: the paper's BatchNorm + Linear probe head, trained on cached features.
- knn: DINO's weighted k-NN, blocked over train rows.
- results: the probe records file (append under a lock, load, select) and predictions.
- stats: bootstrap intervals, mean and sample std.
- files: atomic replaces and writability checks for shared folders.
- progress: the one place for logging and progress bars.
- hints: how to call timecat here, and the `timecat extract` line for members or datasets not cached yet.
- errors: TimecatError, the one error type users see.

Experiments built on the stages: demo (Cat1, Cat2 and Cat4 at one budget on the
CPU), toy (the paper's Section 3 counterexample), dominoes (its Table 1
spurious-feature experiment), diversity (how different members' features are).
"""

__version__ = "0.1.0"
