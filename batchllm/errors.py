"""Errors a user can act on.

``BatchLLMError`` carries a one-line message that the CLI prints as it is (no traceback unless
``--verbose``): an unknown model path, an unreadable input, a bad flag. Anything else that escapes is a
bug and is shown with its traceback.
"""


class BatchLLMError(Exception):
    """A job-level failure with a message fit to show the user as one line."""
