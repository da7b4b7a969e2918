"""One error type for everything a user can get wrong.

Every message is one line that names the problem and what to do about it; the CLI prints it
as ``loraq: error: <message>`` and exits with status 2. Code anywhere in the package raises
``UserError`` for bad input instead of letting a traceback reach the user.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
