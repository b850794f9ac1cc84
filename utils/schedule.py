"""Learning-rate schedule."""
import math


def cosine_lr(step: int, total_steps: int, lr: float) -> float:
    """MiniMind's cosine schedule: from 1.0 * lr at step 0 down to 0.1 * lr at the last step."""
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total_steps))))
