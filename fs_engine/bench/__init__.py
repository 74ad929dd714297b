"""Serving benchmark: workloads, driver, metrics, ablation."""
