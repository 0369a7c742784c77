"""What the tests and benchmarks share: fakes, waiting helpers and process clean-up."""
