"""Strict loading: what differs between the tensors a file has and the ones a model expects."""
from __future__ import annotations


def _some(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def key_mismatch(found: dict, expected: dict) -> str | None:
    """None when ``found`` has exactly the keys of ``expected`` with the same shapes, else a
    short description: the missing keys, the unexpected keys, the first shape that differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape))
    detail = []
    if missing:
        detail.append(f"missing keys {_some(missing)}")
    if unexpected:
        detail.append(f"unexpected keys {_some(unexpected)}")
    if wrong:
        k = wrong[0]
        detail.append(f"{k} has shape {tuple(found[k].shape)} in the file, {tuple(expected[k].shape)} in the model")
    return "; ".join(detail) or None
