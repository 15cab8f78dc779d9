"""Servers the benchmark compares ours against: naive_fastapi, naive_bentoml, do_nothing (its ceiling)."""
