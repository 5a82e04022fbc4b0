"""The test suite as a package, so that test modules share helpers as `tests.conftest` and `tests.faults`."""
