"""Library behind train.py, extract.py, cache.py and plot.py."""
