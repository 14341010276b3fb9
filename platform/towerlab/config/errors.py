"""The one exception type for user mistakes in recipes, sweeps and flags: the CLI prints it as one line."""


class ConfigError(ValueError):
    """A user error: what is wrong, where, and how to fix it, in one line."""
