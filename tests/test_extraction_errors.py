"""User mistakes and environment failures end as one clear line (exit 2), never a traceback:
missing/absent checkpoint, unknown encoder, missing S3 bucket, read-only output, full disk."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from environment import missing
from pipeline.cli import main as refseg
from pipeline.errors import DataError
from pipeline.store import StoreBuilder, resolve_location, sorted_items

from test_store_readwrite import KEY, SHAPES, features_of
from test_store_s3 import s3_endpoint  # noqa: F401  (module-scoped moto S3 server fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]


def extract_args(output, coco_mini_dir, weights, *extra) -> list[str]:
    checkpoint = ["--checkpoint", str(weights)] if weights else []
    return ["extract", "--output", str(output), "--dataset", "coco_mini", "--encoder", "mobilenet_v2", *checkpoint,
            "--encoder-options", '{"input_size": 128}', "--coco-annotations", str(coco_mini_dir / "instances.json"),
            "--image-dir", str(coco_mini_dir / "images"), "--limit", "4", "--images-per-shard", "2",
            "--batch-size", "2", "--no-progress", "--ray-address", "local", *extra]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": "{tmp}/nowhere/weights.pth"}, "checkpoint file for encoder 'mobilenet_v2' not found: {tmp}/nowhere/weights.pth"),
        ({"weights": None}, "encoder 'mobilenet_v2' needs a checkpoint path"),
        ({"extra": ["--encoder", "mobilenet_v3"]}, "unknown encoder 'mobilenet_v3'; available: "),
    ],
)
def test_checkpoint_and_encoder_mistakes_are_one_line(change, message, coco_mini_dir, mobilenet_v2_weights,
                                                      tmp_path, capsys):
    # a missing file lives under this test's tmp_path ({tmp}), never at a fixed place on the machine
    weights = change.get("weights", mobilenet_v2_weights)
    if isinstance(weights, str):
        weights = weights.replace("{tmp}", str(tmp_path))
    message = message.replace("{tmp}", str(tmp_path))
    assert refseg(extract_args(tmp_path / "store", coco_mini_dir, weights, *change.get("extra", []))) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "store").exists()  # refused before touching the output


def test_missing_bucket_is_one_line(s3_endpoint, coco_mini_dir, mobilenet_v2_weights, monkeypatch, capsys):  # noqa: F811
    # The documented way to reach an S3-compatible server from the CLI: AWS_ENDPOINT_URL (+ keys).
    for name, value in {"AWS_ENDPOINT_URL": f"http://{s3_endpoint}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    assert refseg(extract_args("s3://no-such-bucket/stores/x", coco_mini_dir, mobilenet_v2_weights)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot create the store location s3://no-such-bucket/stores/x: Bucket 'no-such-bucket' not found" in line
    assert "set AWS_ENDPOINT_URL" in line
    assert refseg(["verify", "s3://no-such-bucket/stores/x"]) == 2
    assert "no manifest.json" in one_error_line(capsys.readouterr().err)


def _unprivileged_or_mount(command: list[str], setup: str, target: Path) -> list[str]:
    """Run ``command`` where ``target`` is read-only (``setup="ro"``) or a 256 KiB disk (``"tiny"``):
    a private mount namespace when root (nothing leaks, nothing to clean up), else plain chmod."""
    if os.geteuid() != 0:
        if setup == "tiny":
            missing("a real full disk needs a tmpfs mount (root); see test_a_full_disk_in_the_writer_is_one_line")
        target.chmod(0o555)
        return command
    if shutil.which("unshare") is None:
        missing("needs unshare(1) to mount a read-only or tiny filesystem as root")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        missing(f"cannot create a mount namespace here: {probe.stderr.decode()[-200:]}")
    mount = (f"mount --bind -o ro {target} {target}" if setup == "ro"
             else f"mount -t tmpfs -o size=256k refseg-full {target}")
    return ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return env


def test_read_only_output_is_one_line(coco_mini_dir, mobilenet_v2_weights, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    command = _unprivileged_or_mount(
        _cli(extract_args(read_only / "store", coco_mini_dir, mobilenet_v2_weights)), "ro", read_only
    )
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert f"cannot create the store location {read_only / 'store'}:" in line
    assert "read-only filesystem" in line or "permission denied" in line


@pytest.mark.slow  # starts Ray in a subprocess: ~25 s
def test_a_real_full_disk_is_one_line(coco_mini_dir, mobilenet_v2_weights, tmp_path):
    disk = tmp_path / "tiny-disk"
    disk.mkdir()
    command = _unprivileged_or_mount(
        _cli(extract_args(disk / "store", coco_mini_dir, mobilenet_v2_weights, "--encoder-options", "{}")),
        "tiny", disk,
    )  # 1.1 MB of features per image at 512 px: the first shard does not fit in 256 KiB
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert "No space left on device (no space left on the device: free some or write the store elsewhere)" in line


def test_a_full_disk_in_the_writer_is_one_line(tmp_path, monkeypatch):
    """Without root (no tmpfs), the same path with the write failing as a full disk fails it."""
    import webdataset

    builder = StoreBuilder(resolve_location(str(tmp_path / "store")), KEY, SHAPES,
                           sorted_items([(i, f"{i}.jpg") for i in (1, 2)]), 2)
    writer = builder.writer(builder.prepare()[0])

    def full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(webdataset.TarWriter, "write", full)
    with pytest.raises(DataError, match=r"cannot write the temporary shard .*shard-000000.tar.partial-\d+: "
                                        r"\[Errno 28\] No space left on device \(no space left on the device"):
        writer.add("1", features_of("1"))
    builder.close()
