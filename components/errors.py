"""The one exception type users see: a message that names the file, row or key at fault."""


class EaselError(Exception):
    """An error with a message meant for the person running Easel (no traceback needed)."""


class ConfigError(EaselError):
    """params.yaml (or another config file) is missing, malformed, or has a bad key."""


class GateRejected(EaselError):
    """The promotion gate said no. Its reasons are in the message and in the decision record."""
