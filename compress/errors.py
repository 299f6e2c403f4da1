"""The one error type a user sees: a sentence saying what is wrong and how to fix it."""


class CompactLMError(Exception):
    """A problem with the user's input or environment, reported as one clear line (no traceback)."""
