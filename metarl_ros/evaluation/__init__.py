"""Measuring controllers on fault episodes: rollouts, metrics, statistics, tables, plots."""
