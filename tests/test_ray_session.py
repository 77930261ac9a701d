"""The driver's Ray connection: every process of the job knows its cluster's address, so Ray code that
finds "the" cluster by itself (Ray Train's PlacementGroupCleaner queries the state API) works while
another Ray runs on the same machine, instead of failing with "Found multiple active Ray instances"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

BLOCKER = "import ray, time; ray.init(num_cpus=0, include_dashboard=False); print('up', flush=True); time.sleep(600)"


@pytest.mark.slow
def test_a_detached_actor_of_the_job_finds_its_cluster_beside_another_ray() -> None:
    import ray

    from pipeline.ray_session import init_ray

    if ray.is_initialized():
        ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", BLOCKER], env=env, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up", "the other Ray did not start"
        previous = os.environ.pop("RAY_ADDRESS", None)
        init_ray(num_cpus=1)
        try:
            assert "RAY_GCS_SERVER_PORT" not in os.environ  # only the head's start read it
            gcs = ray.get_runtime_context().gcs_address

            @ray.remote(num_cpus=0)
            class Cleaner:  # what Ray Train's PlacementGroupCleaner does: a detached actor, started by an actor
                def check(self) -> tuple[str | None, str]:
                    from ray.util.state import get_actor

                    me = ray.get_runtime_context().get_actor_id()
                    return os.environ.get("RAY_ADDRESS"), get_actor(me, timeout=60).state

            @ray.remote(num_cpus=0)
            class Controller:
                def start(self) -> tuple[str | None, str]:
                    cleaner = Cleaner.options(lifetime="detached").remote()
                    try:
                        return ray.get(cleaner.check.remote())
                    finally:
                        ray.kill(cleaner)

            address, state = ray.get(Controller.remote().start.remote(), timeout=240)
            assert address == gcs and state == "ALIVE"
        finally:
            ray.shutdown()
            if previous is not None:
                os.environ["RAY_ADDRESS"] = previous
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        other.wait(timeout=60)


def test_ports_are_free_distinct_and_never_the_kernels_ephemeral_ones(monkeypatch) -> None:
    """A starting Ray node takes its other ports with ``bind(0)``, i.e. from the kernel's ephemeral
    range: a GCS port chosen there may be handed to one of them, and the head exits (seen in CI)."""
    import socket

    from pipeline import ray_session

    ephemeral_low = ray_session._ephemeral_low()
    ports = [ray_session.free_port("127.0.0.1") for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(ray_session._PORTS_FROM <= port < ephemeral_low for port in ports)
    # a port in use is never chosen
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ray_session, "_PORTS_FROM", busy)
        monkeypatch.setattr(ray_session, "_ephemeral_low", lambda: busy + 2)
        ray_session._HANDED_OUT.discard(busy + 1)
        assert ray_session.free_port("127.0.0.1") == busy + 1


def test_a_kernel_whose_ephemeral_range_starts_low_still_gets_a_port(monkeypatch) -> None:
    from pipeline import ray_session

    monkeypatch.setattr(ray_session, "_ephemeral_low", lambda: 10000)
    assert ray_session._PORTS_FROM <= ray_session.free_port("127.0.0.1") < 65536
