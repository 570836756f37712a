"""Prometheus metrics of the backbone's processes (docs/operations.md, "Metrics")."""
