"""Metrics, cross-validation bookkeeping and result tables."""
