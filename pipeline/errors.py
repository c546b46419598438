"""What a user can fix, and the exit status each command ends with.

A `UserError` is reported by the commands as one line on stderr and its `exit_code`; anything else
is a bug and keeps its traceback. Bad data is neither: it becomes a row with `error` set.
"""

from __future__ import annotations

# Exit statuses, documented in the README ("Exit statuses").
DONE = 0
BUG = 1  # an unexpected error: the traceback is on stderr
BAD_INVOCATION = 2  # a config Hydra cannot compose, a bad value, an unusable input or output; nothing written
ABORTED = 3  # run.max_error_rate exceeded; committed work kept
VERIFICATION_FAILED = 4  # kosmos-export verify=true: the export disagrees with transformers
STALLED = 5  # kosmos-status: a shard says it runs but has not committed for stall_seconds
COMMIT_FAILED = 6  # a part could not be written (disk full, storage refused): committed parts kept
# A run stopped by SIGTERM or SIGINT exits 128 + the signal's number (143, 130), committed work kept.


class UserError(ValueError):
    """Something the user can fix: the message says what and how."""

    exit_code = BAD_INVOCATION
    label = ""


class ConfigError(UserError):
    """A config value that cannot work; the message names the key and what to do."""


class InputError(UserError):
    """The input as a whole cannot be read; the message names the input and what to do."""


class OutputError(UserError):
    """The output folder cannot take this run; the message says why and the ways out."""


class RunAborted(UserError):
    """run.max_error_rate was exceeded; committed parts are kept."""

    exit_code = ABORTED
    label = "Aborted: "


class VerificationFailed(UserError):
    """The export's captions agree with transformers' less than model.min_identical allows."""

    exit_code = VERIFICATION_FAILED
    label = "Verification failed: "


class CommitFailed(UserError):
    """A part could not be committed; the message says how many rows were not written and why."""

    exit_code = COMMIT_FAILED
    label = "Commit failed: "


class Stopped(BaseException):
    """SIGTERM or SIGINT: stop, keeping what is committed. A BaseException, as KeyboardInterrupt is,
    so that nothing on the way catches it as an error."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Stalled(UserError):
    """A shard says it is running but has not committed for stall_seconds."""

    exit_code = STALLED
    label = "Stalled: "
