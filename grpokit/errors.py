"""Errors a user can act on. The CLI prints their message and exits non-zero without a traceback."""


class GrpokitError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""


class ConfigError(GrpokitError):
    """A config key, value or file is wrong."""


class DataError(GrpokitError):
    """A dataset is missing, empty or lacks a column the run needs."""


class RewardError(GrpokitError):
    """A reward function failed or returned something unusable."""


class TrainingError(GrpokitError):
    """Training cannot go on (e.g. non-finite losses step after step); earlier checkpoints are intact."""


class Interrupted(GrpokitError):
    """SIGINT / SIGTERM stopped the run after a checkpoint was written; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
