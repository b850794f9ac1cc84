"""Data side: file formats and their checks, tokenization, the shipped demo world."""
