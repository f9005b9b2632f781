"""Exceptions that the command line reports as a message, without a traceback."""


class PipelineError(Exception):
    """A problem with the user's input, files or environment.

    The message states what failed, on which value, and what to do next.
    Internal failures (bugs) use the built-in exception types instead.
    """
