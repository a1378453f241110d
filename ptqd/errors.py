"""The one error type for user mistakes: the CLI prints its message on one line and exits 1."""


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and how to fix it."""
