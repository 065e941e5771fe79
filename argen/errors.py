"""The one exception type for bad user input.

Anything a user can get wrong (a config key, a model name, a path, a class label) raises ArgenError
with a message that names the bad input. The CLI prints it as one line and exits 2; everything else
is a bug and keeps its traceback.
"""


class ArgenError(Exception):
    """Bad input from the user: printed as one line by the CLI, no traceback."""
