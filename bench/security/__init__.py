"""Security benchmarks and the harnesses they and the tests share: the canary audit and the red-team client."""
