"""Servers the benchmark compares ours against: ``naive_fastapi`` and ``naive_bentoml`` (the obvious
first versions), ``do_nothing`` (a canned answer: the load generator's own ceiling)."""
