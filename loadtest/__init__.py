"""Black-box HTTP load tests of the served model (``python -m loadtest --help``, docs/loadtest.md)."""
