"""The one exception type users see: a message that names the file, row or key at fault."""


class EaselError(Exception):
    """An error with a message meant for the person running Easel (no traceback needed)."""

    exit_code = 2  # unusable input: bad params, an unreadable file, storage that does not answer


class ConfigError(EaselError):
    """params.yaml (or another config file) is missing, malformed, or has a bad key."""


class GateRejected(EaselError):
    """The promotion gate said no. Its reasons are in the message and in the decision record."""

    exit_code = 3


class GateInconclusive(GateRejected):
    """The gate found no failing rule but too little evidence to decide: not promoted either."""

    exit_code = 4
