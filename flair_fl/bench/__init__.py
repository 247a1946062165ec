"""Benchmark: flair-fl's full path against a single-process pure-PyTorch reference."""
