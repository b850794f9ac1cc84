"""A reward for tests with tiny random models, whose short samples all score the same on the built-ins."""


def char_count(prompts, responses, **fields):
    return [float(len(r)) for r in responses]
