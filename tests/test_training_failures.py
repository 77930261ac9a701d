"""Failures inside a training run, without a cluster (issue 20): which errors end the run without a
retry, how the driver turns them into one line and a log file, and damaged training checkpoints.
The same cases end to end, through Ray Train: tests/test_training_faults.py."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from ray.train import ControllerError, WorkerGroupError

from pipeline.errors import ConfigError, DataError
from pipeline.training.failures import StopOnUserError, fit, keeps_traceback, user_error_of
from pipeline.training.state import DIGEST_FILE, STATE_FILE, load_state, save_state


def _raise_data_error(config: dict) -> None:
    raise DataError(f"shard-000000.tar image '{config['image']}' feature 'image_embedding' is corrupted")


def test_a_user_error_in_a_worker_stops_the_run_any_other_is_left_to_ray_trains_retries(capsys):
    wrapped = keeps_traceback(_raise_data_error)
    with pytest.raises(DataError) as caught:
        wrapped({"image": "151"})
    # the traceback text crosses Ray's pickling with the error (an attribute of it)
    shipped = pickle.loads(pickle.dumps(caught.value))
    assert "in _raise_data_error" in shipped.refseg_traceback and "rank ?" in shipped.refseg_traceback

    callback = StopOnUserError("fold 0", max_failures=2)
    with pytest.raises(ControllerError) as stopped:
        callback.after_exception(None, {1: RuntimeError("collateral: the collective was aborted"), 0: shipped})
    assert stopped.value.controller_failure is shipped  # Ray Train's policy never retries this
    callback.after_exception(None, {1: RuntimeError("worker died\nmore lines")})  # retried by Ray Train: a line
    assert capsys.readouterr().err.strip() == (
        "fold 0: Ray Train worker(s) failed (rank 1: RuntimeError: worker died); Ray Train restarts the workers "
        "from the last checkpoint, up to 2 time(s) (--max-failures)")


class _Trainer:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def fit(self):
        raise self.error


def test_the_driver_raises_a_user_error_from_ray_as_one_line_with_its_traceback_in_a_log(tmp_path):
    error = ConfigError("the checkpoint holds the model state of 2 rank(s), this run has 1")
    error.refseg_traceback = "Ray Train worker rank 0:\nTraceback (most recent call last):\n  ...\n"
    with pytest.raises(ConfigError) as caught:
        fit(_Trainer(ControllerError(error)), tmp_path / "logs", "run-fold0")
    message = str(caught.value)
    assert message.startswith("the checkpoint holds the model state of 2 rank(s), this run has 1 (traceback in ")
    assert message.endswith("; not retried: a retry cannot fix it)") and "\n" not in message
    log = Path(re.search(r"traceback in (\S+);", message).group(1))
    assert log.parent == tmp_path / "logs" and log.name.startswith("run-fold0-error-")
    assert log.read_text() == error.refseg_traceback
    # retries ran out on a user error (a Ray without the callback): the same line
    with pytest.raises(DataError, match="corrupted .*traceback in"):
        fit(_Trainer(WorkerGroupError("x", {0: DataError("corrupted")})), tmp_path / "logs", "run-fold0")
    # anything else is Ray's failure, raised as it is (a traceback: a bug or a lost worker)
    failure = WorkerGroupError("worker died", {0: RuntimeError("segfault")})
    with pytest.raises(WorkerGroupError):
        fit(_Trainer(failure), tmp_path / "logs", "run-fold0")
    assert user_error_of(failure) is None


def _state(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoint_step0000004"
    directory.mkdir()
    save_state(directory, {"fingerprint": "abc", "model": {"w": torch.arange(4096.0)}, "progress": {"global_step": 4}})
    return directory


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty"])
def test_a_damaged_training_checkpoint_is_refused_naming_it(tmp_path, damage):
    directory = _state(tmp_path)
    assert load_state(directory, "abc")["progress"] == {"global_step": 4}
    path = directory / STATE_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":  # inside a tensor: torch's zip reader alone would load it
        data[len(data) // 2] ^= 0x01
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    source = "s3://bucket/runs/r-fold0/checkpoint_step0000004"
    with pytest.raises(DataError, match=re.escape(f"training checkpoint {source}/{STATE_FILE} is truncated or corrupt")):
        load_state(directory, "abc", source=source)


def test_checkpoints_without_a_digest_still_load_and_other_configurations_are_refused(tmp_path):
    directory = _state(tmp_path)
    (directory / DIGEST_FILE).unlink()  # written before the digest existed
    assert load_state(directory, "abc")["progress"] == {"global_step": 4}
    with pytest.raises(DataError, match="written by another configuration"):
        load_state(directory, "other")
    (directory / STATE_FILE).write_bytes((directory / STATE_FILE).read_bytes()[:100])
    with pytest.raises(DataError, match="is truncated or corrupt"):  # torch's own error, named
        load_state(directory, "abc")
