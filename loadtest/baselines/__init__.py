"""Reference servers the benchmark compares our service against.

- ``naive_fastapi``: FastAPI + onnxruntime, the obvious 30 lines anyone would write.
- ``naive_bentoml``: BentoML + onnxruntime, one typed endpoint, every default left alone.
- ``do_nothing``: answers ``/predict`` with a canned response without looking at the image, so
  its throughput is the ceiling of the load generator (locust) on this machine, not of a server.
"""
