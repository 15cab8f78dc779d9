"""Servers the benchmark compares ours against: naive_fastapi, do_nothing (the generator's ceiling), peers."""
