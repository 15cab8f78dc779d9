"""Load tests (locust), naive baselines and the side-by-side serving benchmark (issue 5)."""
