"""What a command ends with when it cannot go on, and its exit code; the command line maps
each to one line on stderr. (A full disk is files.DiskFull, exit 75.)"""


class ConfigError(ValueError):
    """Bad user input: the message is one line naming the flag and the valid values. Exit 2."""
    EXIT_CODE = 2


class RunLocked(Exception):
    """Another process holds the run folder (a run, or a sweep runner looking at it): the message
    names it. Exit 73, so that a sweep runner can tell "running elsewhere" from "failed"."""
    EXIT_CODE = 73
