"""The one exception type for mistakes a user can fix: the CLI prints its message as one line and exits 2."""


class TntError(Exception):
    """Bad input (unknown name, missing path, wrong checkpoint...). The message is shown to the user as is."""


class TntWarning(UserWarning):
    """Something the user should know that did not stop the command (e.g. unreadable images left out). The CLI
    prints it as one `warning:` line, without Python's file/line prefix and source line."""


EXIT_PREEMPTED = 75          # EX_TEMPFAIL: stopped by a signal after saving; requeue with --resume


class Preempted(Exception):
    """Training stopped by SIGTERM/SIGINT once the current step finished and the checkpoint was saved."""
