"""The scripts behind docs/benchmarks.md; run each from the repository root as
`python -m benchmarks.<name>`."""
