"""Measuring what pruning costs and saves: demo, visualizations, benchmarks."""
