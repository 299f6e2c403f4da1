"""The one error type a user sees: a sentence saying what is wrong and how to fix it."""

from __future__ import annotations


class CompactLMError(Exception):
    """A problem with the user's input or environment, reported as one clear line (no traceback).

    `key` names the config field the problem is in, when there is one: a config read from a file then reports
    the line that field was written on (compactlm.core.config).
    """

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key
