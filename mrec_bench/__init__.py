"""mrec_bench: the benchmark of the book *Meta-Learning and Language Models for Recommender Systems*.

``python -m mrec_bench <command>`` (:mod:`mrec_bench.cli`). It composes ``mrec_utils`` and the chapters'
settings; only the benchmark chapter (12) and the tools page import it.

- ``speed``: meta-training speed, ``vmap`` vs a Python loop vs ``higher`` vs a hand-batched reference.
- ``ranking``: chapters 5, 7 and 9 ranking the query films of the same cold-start episodes.
- ``sweep``: data set x scenario x k x seed on Dask (a local cluster, or a scheduler's address).
- ``nextfilm``: chapter 7's next-film comparison (item-GPT, popularity, co-occurrence) on any release.
- ``reports``: the committed results (``mrec_bench.results``) and their tables with intervals.
"""

__version__ = "0.2.0"
