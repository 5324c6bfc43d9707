"""Typed errors. Every message names the problem and the fix."""


class ThriftyError(Exception):
    """Base class of every error thrifty raises on purpose."""


class ConfigError(ThriftyError, ValueError):
    """A configuration value is invalid."""


class SpecError(ThriftyError, ValueError):
    """A backbone or data spec string cannot be resolved."""


class DataError(ThriftyError, ValueError):
    """A dataset or split file is missing, malformed or inconsistent."""


class CheckpointError(ThriftyError, ValueError):
    """A checkpoint or adapter file does not fit the model, or is corrupt."""


class NoMatchingModuleError(ThriftyError, ValueError):
    """`target_modules` matched nothing in the model (PEFT's NoMatchingPeftModuleError)."""


class NonFiniteLossError(ThriftyError, FloatingPointError):
    """The training loss became NaN or infinite."""


class ResultsExistError(ThriftyError, FileExistsError):
    """An output directory already holds finished results that would be overwritten."""


class DiskSpaceError(ThriftyError, OSError):
    """The disk cannot hold what a command would write (the message names the flag that writes anyway)."""
