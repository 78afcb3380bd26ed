"""The one exception type for mistakes in the command line or the data (torch-free: the CLI catches it)."""


class UserError(ValueError):
    """A bad flag value, a missing or broken file: `disalign-train` prints it as one line
    (the traceback with --debug). A ValueError, so library callers can catch it as one."""
