"""The one exception type that reaches the user as a message, not a stack trace."""


class PotionError(Exception):
    """A problem with the user's input or environment.

    The message must say what is wrong and how to fix it; the command line prints it
    and exits with status 2.
    """
