"""The one exception type for mistakes a user can make; the CLI prints it as one line and exits 2."""


class MoepressError(Exception):
    """A user-caused error (bad path, bad budget, unsupported model, ...). Message names the fix."""
