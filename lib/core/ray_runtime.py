"""Starting or joining a Ray runtime for the distributed engine (`--engine ray`, `--ray_address`).

No address: a local runtime on this machine (`num_cpus` / `num_gpus` as given, else Ray's own
count). `auto` joins the cluster this machine belongs to (e.g. one started with `ray start` inside
a Slurm allocation); `ray://host:10001` or `host:6379` joins that cluster. Ray is optional: a
clear error says how to install it when it is missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENGINES", "RayUnavailable", "start_ray", "stop_ray"]

ENGINES = ("local", "ray")


class RayUnavailable(RuntimeError):
    """Ray is not installed or the cluster cannot be reached."""


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Any:
    """Initialise Ray once per process (a no-op when it already is); returns the `ray` module."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--engine ray needs Ray: .env/bin/pip install 'ray==2.60.0' (listed in "
                             "requirements.txt; setup.sh installs it)") from None
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray runtime"
        raise RayUnavailable(f"could not start or join {where}: {exc}") from None
    return ray


def stop_ray() -> None:
    """Shut the runtime down if this process started or joined one."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
