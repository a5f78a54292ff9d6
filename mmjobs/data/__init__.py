"""Datasets: the canonical format, converters, synthetic charts, validation, pretokenization."""
