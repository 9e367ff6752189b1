"""Ray, imported lazily: a local instance on loopback, or a cluster joined by address.

Ray is the optional extra ``[distributed]``. Nothing in this package imports it at module
level; every entry point calls :func:`import_ray` (or :func:`import_tune`), which fails with
one line saying what to install.

A local instance (no address) keeps every server on 127.0.0.1. Passing
``_node_ip_address="127.0.0.1"`` alone does not do that on Linux: Ray replaces a loopback node
address by the machine's outside address unless it runs in its single-machine mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and Windows), so both are set.
Usage statistics (``RAY_USAGE_STATS_ENABLED``) are off: nothing is sent anywhere. The local
instance is always a new one (``address="local"``): a plain ``ray.init()`` would join a
cluster that ``ray start`` left on the machine (even a dead one) or one named by
``RAY_ADDRESS``. With an address, the cluster's own settings apply; a cluster started on
loopback (found by ``auto`` or named ``127.0.0.1:PORT``) gets the single-machine mode too
(``ray start``, docs/SCALING.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from metarl_ros.core.errors import MetarlError

REQUIREMENT = "ray[tune]>=2.60"
INSTALL_HINT = "pip install 'metarl_ros[distributed]' (or: pip install 'ray[tune]>=2.60')"
LOOPBACK = "127.0.0.1"
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Set (unless already set) before a local instance starts (module doc)."""


class RayMissingError(MetarlError):
    """A Ray-only option was used and Ray is not installed."""


def import_ray(feature: str) -> Any:
    """The ``ray`` module, or :class:`RayMissingError` naming ``feature`` and the extra."""
    try:
        import ray
    except ImportError as error:
        raise RayMissingError(
            f"{feature} needs Ray, which is not installed ({error}): {INSTALL_HINT}"
        ) from None
    return ray


def import_tune(feature: str) -> Any:
    """The ``ray.tune`` module, or :class:`RayMissingError` as :func:`import_ray`."""
    import_ray(feature)
    try:
        from ray import tune
    except ImportError as error:
        raise RayMissingError(
            f"{feature} needs Ray Tune, which is not installed ({error}): {INSTALL_HINT}"
        ) from None
    return tune


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) names this machine's
    loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _single_machine_mode(ray: Any) -> None:
    """Ray's single-machine switch: read from the environment when Ray is imported, so for a
    Ray imported before :data:`LOCAL_ENV` was set it is set on the imported module too."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False


def _resolve_auto() -> str | None:
    """The cluster ``address="auto"`` joins (``RAY_ADDRESS``, else the last ``ray start`` on
    this machine), to tell whether it is on loopback; None if Ray cannot tell."""
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment("auto", None)
    except Exception:  # a private helper: if it moved or fails, ray.init reports the problem
        return None


@contextmanager
def ray_session(
    feature: str, address: str | None = None, num_cpus: int | None = None
) -> Iterator[Any]:
    """Ray for the duration of a ``with`` block; yields the ``ray`` module.

    Without ``address`` a local instance starts on loopback with ``num_cpus`` CPUs (default:
    all this process may use), no dashboard; with ``address`` (``auto``, ``host:port``) this
    process joins that cluster. Afterwards the local instance is shut down, or the cluster
    left. If Ray is already initialized in this process (a test, a notebook), it is used as
    it is and left running.
    """
    before = {key: os.environ.get(key) for key in LOCAL_ENV}
    try:
        ray = import_ray(feature)
        if ray.is_initialized():
            yield ray
            return
        target = _resolve_auto() if address == "auto" else address
        local = address is None or (target is not None and is_loopback(target))
        if local:  # a new instance, or one started on loopback (ray start, docs/SCALING.md)
            for key, value in LOCAL_ENV.items():
                os.environ.setdefault(key, value)
            _single_machine_mode(ray)
        try:
            if address is None:  # "local": a new instance even if `ray start` ran here
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         _node_ip_address=LOOPBACK)
            else:
                ray.init(address=address)
        except ConnectionError as error:
            hint = ("; joined by address, a cluster with token authentication (Ray's default) "
                    "needs RAY_AUTH_MODE=token here (docs/SCALING.md)"
                    if "RAY_AUTH_MODE" not in os.environ and address != "auto" else "")
            raise MetarlError(f"--address {address}: {error}{hint}") from None
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:  # Ray's processes have what they need; the caller gets its environment back
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
