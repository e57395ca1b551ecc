"""Synthetic-data generators: prompt formats and output parsers for instruction synthesizers."""
