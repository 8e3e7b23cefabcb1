"""mrec_utils: the utility package of the book *Meta-Learning and Language Models for Recommender Systems*, one
job per module: data, tasks, meta, metrics, models, gpt, lm, streams, conversation, train, plots, prose (glue);
coldstart, heads and metaemb are written in chapters 5, 9 and 10 and exported (``make export``). The benchmark is
its own package, ``mrec_bench`` (``python -m mrec_bench ...``)."""

__version__ = "0.2.0"
