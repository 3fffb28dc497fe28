"""Data sources: real data sets (cached, checksummed) and synthetic benchmarks."""
