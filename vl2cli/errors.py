"""Known failures. Each becomes one line on stderr and a non-zero exit code at the CLI's one error boundary
(`vl2cli.cli.main`); a page that fails becomes a failed record, never a failed run."""


class Vl2Error(Exception):
    """A failure we can explain in one line (the message names the file and the problem)."""

    exit_code = 1


class UsageError(Vl2Error):
    """An option, argument or combination that cannot work; found before any model is loaded where possible."""

    exit_code = 2


class ConfigError(Vl2Error):
    """A config.json value the model cannot honour."""


class CheckpointError(Vl2Error):
    """A checkpoint that is missing, incomplete, mis-shaped or in a refused format."""


class InputError(Vl2Error):
    """An input document or image that cannot be read."""


class OutputError(Vl2Error):
    """An output that cannot be written."""


class OutputBusy(OutputError):
    """Another vl2 run holds the output folder's lock."""


class DeviceError(Vl2Error):
    """The device cannot hold what was asked (found before any weight is read)."""


class PageFailed(Vl2Error):
    """One page could not be read (the page's record says why; the run goes on)."""


class OutOfMemory(PageFailed):
    """Out of memory even at batch 1 with chunked prefill."""
