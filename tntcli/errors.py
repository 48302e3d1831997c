"""The one exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""


class TntError(Exception):
    """Bad input (unknown name, missing path, wrong checkpoint...). The message is shown to the user as is."""
