"""The errors moe_lm reports to users: one clear paragraph, no traceback from deep inside torch."""


class MoeLMError(Exception):
    """Base class: the message says what went wrong and what to change."""


class ConfigError(MoeLMError):
    """A config value or combination that cannot work."""


class DataError(MoeLMError):
    """Missing, empty or too-small data, or data that does not match the run."""


class CheckpointError(MoeLMError):
    """A checkpoint that is corrupt, truncated or from a different model or tokenizer."""


class DiskFullError(CheckpointError):
    """A save that ran out of disk space (the message says how much to free)."""


class RunLockedError(MoeLMError):
    """The run directory is in use by another live run."""
