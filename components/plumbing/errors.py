"""The one exception type users see: a message that names the file, row or key at fault."""

# Ends the one error line of a failure that may pass by itself (a server that did not answer): the
# flows retry a stage only when its line says so; every other failure is deterministic.
TEMPORARY = "(temporary: retrying may help)"


class EaselError(Exception):
    """An error with a message meant for the person running Easel (no traceback needed)."""

    exit_code = 2  # unusable input: bad params, an unreadable file, storage that does not answer

    def __init__(self, *args: object, transient: bool = False) -> None:
        super().__init__(*args)
        self.transient = transient  # may pass by itself: worth a retry

    def line(self) -> str:
        """The message as the command's one error line says it."""
        return f"{self} {TEMPORARY}" if self.transient else str(self)


class ConfigError(EaselError):
    """params.yaml (or another config file) is missing, malformed, or has a bad key."""


class GateRejected(EaselError):
    """The promotion gate said no. Its reasons are in the message and in the decision record."""

    exit_code = 3


class GateInconclusive(GateRejected):
    """The gate found no failing rule but too little evidence to decide: not promoted either."""

    exit_code = 4
