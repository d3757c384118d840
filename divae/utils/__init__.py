"""Dependency-free helpers every package shares (typed configs, rank-aware logging).

They live at the bottom of the import graph so that `trainer`, `evaluation` and `data_pipeline` can use
them while imports still run one way; nothing here imports torch at module level.
"""
