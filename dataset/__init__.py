"""Data side: file formats and their checks, tokenization through the chat template, padded batches,
answer checks, the shipped demo world."""
