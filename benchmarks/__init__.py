"""Benchmarks: each prints its figures against a baseline measured in the same run. Run them from the
repository root as modules, `python -m benchmarks.NAME`, so they import the project and each other
without editing sys.path; results and machines are in docs/benchmarks.md."""
