"""Black-box HTTP load tests of the served model: locust scenarios, naive baselines, the side-by-side
serving benchmark and the soak (``python -m loadtest --help``; docs/loadtest.md)."""
