"""The one exception type for bad user input.

Everything a user can get wrong (a config typo, a missing path, a corrupt file, an over-long prompt)
raises `GptforgeError` with a one-line message naming what is wrong and what is allowed. The CLI
prints it without a traceback; library callers can catch it (it is a `ValueError`).
"""


class GptforgeError(ValueError):
    """Bad user input: the message is one line naming the culprit and what is allowed."""
