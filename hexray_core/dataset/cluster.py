"""Connecting to a Ray cluster for `--ray [auto|ADDRESS]` (ray is imported only when asked for).

``auto``: the cluster ``RAY_ADDRESS`` names, else a new local one on this machine's CPUs/GPUs.
Anything else is an address (``ray://host:10001``, ``host:6379``). A process that has already
called ``ray.init`` (a notebook, a test) keeps its cluster.
"""

from __future__ import annotations

import logging
import os

from hexray_core.errors import HexRayError
from trace_format import TraceFormatError


def import_ray(data: bool = True):
    try:
        import ray

        if data:
            import ray.data  # noqa: F401 - the dataset recorder needs Ray Data, not only ray core
    except ModuleNotFoundError as e:
        raise HexRayError(f"--ray needs {e.name}, which is not installed: pip install 'hexray[ray]'") from None
    return ray


def connect(address: str | None = "auto", *, data: bool = True):
    """ray, initialised: an existing session, RAY_ADDRESS, the given address, or a new local cluster."""
    ray = import_ray(data)
    if ray.is_initialized():
        if data:
            quiet_ray_data()
        return ray
    target = None if address in (None, "", "auto") else address
    if target is None:
        target = os.environ.get("RAY_ADDRESS") or None
    # Ray's own start-up notices are not the user's business on stderr; its logs stay in the
    # session folder (/tmp/ray/session_*/logs).
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        ray.init(address=target, logging_level=logging.ERROR, include_dashboard=False,
                 log_to_driver=False, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = target or "a local cluster"
        raise HexRayError(f"--ray: cannot connect to {where}: {str(e).splitlines()[0] if str(e) else e}") from None
    if data:
        quiet_ray_data()
    return ray


def ray_map(fn, tasks, address: str | None = "auto"):
    """fn over tasks as Ray tasks (one CPU each), a bounded number in flight; results as they finish."""
    ray = connect(address, data=False)
    remote = ray.remote(num_cpus=1)(fn)
    window = max(2, 2 * int(resources().get("CPU", 1)))
    pending = []
    for task in tasks:
        pending.append(remote.remote(task))
        if len(pending) >= window:
            done, pending = ray.wait(pending, num_returns=1)
            yield _get(ray, done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield _get(ray, done[0])


def _get(ray, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        err = user_error(e)
        if err is not None:  # a user error in a task: one line, not a remote traceback
            raise HexRayError(str(err).splitlines()[0]) from None
        raise


def quiet_ray_data() -> None:
    """HexRay prints its own progress line; Ray Data's bars and INFO logs would interleave with it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    # Ray Data logs a failed task's remote traceback at ERROR; HexRay reports the error itself.
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def user_error(e: BaseException) -> Exception | None:
    """The user error (HexRayError, or TraceFormatError for a missing or damaged shard) behind a Ray failure
    (a task's or an actor's), if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError is also an instance of its cause's class,
        if isinstance(cause, BaseException):  # but its text is the remote traceback: use the cause
            e = cause
            continue
        if isinstance(e, HexRayError | TraceFormatError):
            return e
        e = e.__cause__ or e.__context__
    return None
