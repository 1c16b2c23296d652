"""What a command ends with when it cannot go on, and its exit code; the command line maps
each to one line on stderr. (A full disk is files.DiskFull, exit 75.)"""


class ConfigError(ValueError):
    """Bad user input: the message is one line naming the flag and the valid values. Exit 2."""
    EXIT_CODE = 2
