"""The three error kinds a user can cause; command lines print the message and exit 2."""


class ConfigError(ValueError):
    """A configuration key or value that cannot work; the message names the key."""


class DataError(ValueError):
    """Input data that is missing, empty, unreadable or too short; names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the model; names the path."""
