"""Exception types shared by every stage.

`BadInputError` is recorded per pair and never retried; `ConfigError` fails fast before GPU work
and is never retried; `TrainingDivergedError` (non-finite loss) is deterministic and never retried;
anything else (I/O hiccups, OOM) is treated as transient by the orchestrator.
"""

from __future__ import annotations


class EgptError(Exception):
    """Base class of the project's own errors."""


class BadInputError(EgptError):
    """A data file (event stream, image, video, questions) is missing, truncated or malformed.

    The message always names the file and the problem: ``BadInputError(path, "truncated .npy")``.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(EgptError):
    """A setting is wrong (unknown level, size mismatch, incompatible tokenizers, unreachable store)."""


class StoreError(EgptError):
    """A store is inconsistent or unsafe (bad manifest, checksum mismatch, path escaping the store)."""


class TrainingDivergedError(EgptError):
    """Training produced a non-finite loss: the learning rate is too high, or the data holds
    non-finite rows. Retrying the same run gives the same result."""
