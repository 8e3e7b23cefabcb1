"""The committed results of the benchmark sweep (``python -m mrec_bench sweep``), shipped inside the
installed package as ``mrec_bench.results``: read them with ``importlib.resources.files("mrec_bench.results")``."""
