"""Connecting a job's driver to Ray: the cluster of ``ray job submit`` / ``--ray-address``, or an
embedded local Ray.

Every process of the job (tasks and actors, including the ones Ray's libraries start themselves)
gets ``RAY_ADDRESS`` = the cluster's GCS address in its environment. Without it, code that finds
"the" cluster by itself (Ray Train's ``PlacementGroupCleaner`` queries the state API every second)
looks for running Ray instances on the machine and fails with "Found multiple active Ray instances"
as soon as another Ray runs there, or picks the other one. An embedded local Ray is therefore
started on a GCS port chosen here, so that its address is known before it starts.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from typing import Any

_ADDRESS_ENV = "RAY_ADDRESS"
# Read by Ray when it starts a head node (the GCS port; 0 or unset: a random one).
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_HOST_PORT = re.compile(r"^[\w.\-]+:\d+$")


_HANDED_OUT: set[int] = set()
_PORTS_FROM = 20000  # above Ray's worker ports (10002-19999 by default)


def free_port(host: str = "") -> int:
    """A port free on ``host`` now, not handed out before by this process, and below the kernel's
    ephemeral range. Not ``bind(0)``: that gives an ephemeral port, which the kernel may hand to the
    next ``bind(0)`` once released, and a starting Ray node picks its other ports that way; the GCS
    then finds its port taken and the head exits."""
    low, high = _PORTS_FROM, _ephemeral_low()
    if high <= low:  # a kernel whose ephemeral range starts below 20000: the ports above Ray's, all of them
        high = 65536
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high} on {host or 'any address'}")


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _job_sets_address() -> bool:
    """Whether the submitted job's own runtime env already sets RAY_ADDRESS (ray.init refuses a
    second value for the same variable)."""
    try:
        job = json.loads(os.environ.get(_JOB_CONFIG_ENV) or "{}")
    except json.JSONDecodeError:
        return False
    return _ADDRESS_ENV in (((job or {}).get("runtime_env") or {}).get("env_vars") or {})


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` for a job's driver (no-op when Ray is initialised already).

    ``address``: a cluster (``host:port``, ``auto``, ``ray://...``); None: ``RAY_ADDRESS`` (set by
    ``ray job submit``), else an embedded local Ray (``"local"``: never a cluster that another
    ``ray start`` on this machine left in ``/tmp/ray/ray_current_cluster``). ``kwargs`` go to
    ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get(_ADDRESS_ENV) or None
    env_vars: dict[str, str] = {}
    previous_port = os.environ.get(_GCS_PORT_ENV)
    if target is None:
        port = free_port()
        os.environ[_GCS_PORT_ENV] = str(port)
        env_vars[_ADDRESS_ENV] = f"{ray.util.get_node_ip_address()}:{port}"
    elif _HOST_PORT.match(target) and not _job_sets_address():
        env_vars[_ADDRESS_ENV] = target
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    if env_vars:
        runtime_env["env_vars"] = {**env_vars, **(runtime_env.get("env_vars") or {})}
    try:
        ray.init(address=target or "local", runtime_env=runtime_env or None, **kwargs)
    finally:
        if target is None:  # only the head's start reads it
            if previous_port is None:
                os.environ.pop(_GCS_PORT_ENV, None)
            else:
                os.environ[_GCS_PORT_ENV] = previous_port
