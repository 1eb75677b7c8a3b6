"""Explanation sanity checks (model parameter randomization)."""
