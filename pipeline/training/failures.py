"""Errors a retry cannot fix end a Ray Train run at once, as one line, never retried.

Ray Train restarts a failed worker group from its last checkpoint up to ``FailureConfig(max_failures)``
times: right for a worker that died (a lost node, OOM), wrong for a corrupt feature store, a
truncated checkpoint or a bad configuration, which fail the same way on every attempt (a truncated
shard was retried 3 times, 175 s, its cause buried in 372 lines of stderr). Such errors are refseg's
user errors (:data:`pipeline.errors.USER_ERRORS`: ``DataError``, ``ConfigError``, ``ModelError``), and:

* the worker (:func:`keeps_traceback` around the training function) records the error's traceback
  on it (an attribute, so it crosses Ray's pickling with the error) before Ray Train gets it;
* the controller (:class:`StopOnUserError`, a Ray Train ``UserCallback``: Ray calls
  ``after_exception`` in the controller right after a poll found failed workers, before its failure
  policy decides) raises ``ControllerError(error)``: Ray Train's default failure policy retries a
  ``ControllerError`` only for a worker group that failed to start, so the run ends at once
  (``ray/train/v2/_internal/execution/failure_handling/default.py``, Ray 2.60; Ray offers no public
  hook for a custom failure policy);
* the driver (:func:`fit`) finds the user error in the ``TrainingFailedError``, writes its traceback
  to a log file and raises it with the log's path: ``run_cli`` prints one line and exits 2.

A worker that dies or raises anything else is retried as before.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import ray.train
from ray.train import ControllerError, LoggingConfig, TrainingFailedError, UserCallback

from pipeline.errors import USER_ERRORS, ConfigError, DataError, RefsegError
from refseg_models.errors import ModelError

TRACEBACK_ATTRIBUTE = "refseg_traceback"


def keeps_traceback(train_fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Wrap a training function so a user error raised in it carries its traceback text (with the
    worker's rank) to the driver."""

    @functools.wraps(train_fn)
    def wrapper(config: dict) -> Any:
        try:
            return train_fn(config)
        except USER_ERRORS as error:
            text = "".join(traceback.format_exception(error))
            setattr(error, TRACEBACK_ATTRIBUTE, f"Ray Train worker rank {_world_rank()}:\n{text}")
            raise

    return wrapper


def _world_rank() -> str:
    try:
        return str(ray.train.get_context().get_world_rank())
    except Exception:  # not inside a Ray Train worker (a direct call, a test): the rank is unknown
        return "?"


def first_user_error(errors: dict[int, BaseException] | None) -> BaseException | None:
    """The user error of the lowest rank among ``{rank: error}``, or None."""
    for _, error in sorted((errors or {}).items()):
        if isinstance(error, USER_ERRORS):
            return error
    return None


class StopOnUserError(UserCallback):
    """Ends the run, without a retry, when a worker failed with a user error (see the module doc);
    any other failure is retried by Ray Train's policy, and said in one line here (Ray Train's own
    console logs are off: :data:`RAY_TRAIN_LOGGING`)."""

    def __init__(self, what: str = "training", max_failures: int = 0) -> None:
        self.what, self.max_failures = what, max_failures

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        error = first_user_error(worker_exceptions)
        if error is not None:
            raise ControllerError(error)
        failed = ", ".join(f"rank {rank}: {_first_line(error)}" for rank, error in sorted(worker_exceptions.items()))
        print(f"{self.what}: Ray Train worker(s) failed ({failed}); Ray Train restarts the workers from the last "
              f"checkpoint, up to {self.max_failures} time(s) (--max-failures)", file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# Ray Train's console logs off: its INFO lines and, on a failure, the worker's and the controller's
# tracebacks (~90 lines for one corrupt store entry) would bury the one line the driver prints.
# Ray Train's system log files (<Ray session>/logs/train/) keep every level.
RAY_TRAIN_LOGGING = LoggingConfig(log_level="CRITICAL")


def user_error_of(error: BaseException) -> BaseException | None:
    """The refseg user error a ``TrainingFailedError`` carries (from :class:`StopOnUserError`, or
    from the last attempt's workers when retries ran out), or None."""
    if isinstance(error, ControllerError) and isinstance(error.controller_failure, USER_ERRORS):
        return error.controller_failure
    return first_user_error(getattr(error, "worker_failures", None))


def error_log_folder(storage_path: str, ray_run_name: str) -> Path:
    """Where the driver writes the traceback of a user error inside Ray: the Ray run's own folder
    when the storage is local (beside its checkpoints), else the driver machine's temp folder."""
    if "://" in storage_path:
        return Path(tempfile.gettempdir()) / "refseg-errors"
    return Path(storage_path) / ray_run_name


def fit(trainer: Any, log_folder: str | Path, name: str) -> Any:
    """``trainer.fit()``; a user error inside Ray is raised again as one line (of the same base
    type: exit code 2) naming the log file ``log_folder/<name>-error-<time>.log`` that holds its
    traceback."""
    try:
        return trainer.fit()
    except TrainingFailedError as failure:
        error = user_error_of(failure)
        if error is None:
            raise
        log = Path(log_folder) / f"{name}-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
        text = getattr(error, TRACEBACK_ATTRIBUTE, None) or "".join(traceback.format_exception(error))
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(text)
            where = f"traceback in {log}"
        except OSError as write_error:
            where = f"its traceback could not be written to {log}: {write_error}"
        kind = next(base for base in (DataError, ConfigError, ModelError, RefsegError) if isinstance(error, base))
        raise kind(f"{error} ({where}; not retried: a retry cannot fix it)") from None
