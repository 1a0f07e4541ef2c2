"""deploybot benchmarks: `python -m bench` (see README.md here). Not run by the test suite."""
