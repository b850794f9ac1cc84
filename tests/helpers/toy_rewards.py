"""A reward for tests with tiny random models, whose short samples all score the same on the built-ins."""


def char_count(prompts, responses, **fields):
    return [float(len(r)) for r in responses]


def raises(prompts, responses, **fields):
    """A user's reward function with a bug in it."""
    return [len(r) / 0 for r in responses]
