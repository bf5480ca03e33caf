"""Known failures: each becomes one line on stderr and a non-zero exit code at the CLI boundary."""


class Vl2Error(Exception):
    """A failure we can explain in one line (the message names the file and the problem)."""

    exit_code = 1


class UsageError(Vl2Error):
    exit_code = 2


class ConfigError(Vl2Error):
    """A config.json value the model cannot honour."""


class CheckpointError(Vl2Error):
    """A checkpoint that is missing, incomplete, mis-shaped or in a refused format."""


class InputError(Vl2Error):
    """An input document or image that cannot be read."""


class OutputError(Vl2Error):
    """An output that cannot be written."""
