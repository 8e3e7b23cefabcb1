"""mrec_utils: the thin utility package behind the book *Meta-Learning and Language Models for
Recommender Systems*. Each module has one job; see the book's chapters for how they are used.
The benchmark is its own package, ``mrec_bench`` (``python -m mrec_bench ...``).

- ``data``: MovieLens releases (registry, checksums, cache) as tidy DataFrames; item text.
- ``tasks``: cold-start splits, support/query episodes, padding and masks, leakage checks.
- ``meta``: MAML, FOMAML, ANIL, Reptile, Meta-SGD, prototypical and matching heads (torch.func).
- ``metrics``: MAE, RMSE, nDCG@k, HR@k, AUC, bootstrap intervals.
- ``train``: seeding, device choice, progress bars, early stopping.
- ``plots``: one figure style.
"""

__version__ = "0.2.0"
