"""Scheduling: who runs in each step, and how much of them."""
