"""Errors a user can act on. The CLI prints their message and exits with status 2."""
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text) -> str:
    """A message as one plain line: terminal escapes removed, newlines and tabs folded into spaces
    (library messages carry both; an error or warning line must not)."""
    return " ".join(_ANSI.sub("", str(text)).split())


class VarRtError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(VarRtError):
    """A model config or a combination of options is invalid."""


class CheckpointError(VarRtError):
    """A checkpoint file cannot be read or does not match the model config."""


class InputError(VarRtError):
    """A request (class ids, batch size, image, mask) is invalid."""


class BackendUnavailableError(VarRtError):
    """A backend or its package is missing on this machine."""


class EngineMismatchError(VarRtError):
    """Exported graphs or engines were built for another model, GPU or batch size."""


class GpuMemoryError(VarRtError):
    """The GPU ran out of memory for this batch; the pipeline is still usable with a smaller one."""
