"""Experiments built on the five stages, apart from them: each writes its figure and a JSON beside it.

- demo: Cat1, Cat2 and Cat4 at one total budget, on the CPU (``timecat demo``).
- toy: the paper's Section 3 counterexample (``timecat toy``).
- dominoes: the paper's Table 1 spurious-feature experiment (``timecat dominoes``).
- diversity: how different members' features are, from the cache (``timecat diversity``).

They orchestrate stages (and may import them); no stage imports an experiment.
"""
