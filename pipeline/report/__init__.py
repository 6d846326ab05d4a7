"""Records -> the paper's tables, plots and paired comparisons.

- tables: the tables, paired comparisons and the report command (writes the plots).
- plots: the figures (top-1 against N, in- against out-of-distribution, few-shot) and their JSON.
"""
