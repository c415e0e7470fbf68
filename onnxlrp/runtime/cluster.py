"""Run batches of work on Ray actors, on a local Ray instance or an existing cluster.

A *job* is a small picklable object that says how to start a worker: ``job.open(device,
threads)`` runs once per actor (it opens the onnxruntime sessions) and returns a callable
that takes one batch and returns its result. ``map_batches(job, batches, cluster)`` runs
every batch through Ray Data's actor pool and returns the results in the order of the
batches: the driver then aggregates them exactly as a single process would, so the numbers
do not depend on where a batch ran. The batches are the single-process command's batches,
one item each, so that onnxruntime sees the same inputs in the same groupings.

Ray is an optional extra: ``pip install 'onnxlrp[ray]'``.
"""
from __future__ import annotations

import logging
import pickle
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

from ..errors import ClusterError, OnnxLrpError, SettingError, first_line

INSTALL = "pip install 'onnxlrp[ray]'"


@dataclass(frozen=True)
class Cluster:
    """Where to run: address None starts a local Ray instance (or uses the one this process
    has started); 'auto' or 'ray://host:port' joins a cluster. concurrency: actors, one
    onnxruntime session (set) each."""

    address: str | None = None
    concurrency: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SettingError("concurrency must be at least 1")


class Job(Protocol):
    def open(self, device: str, threads: int | None) -> Callable[[Any], Any]: ...


_QUIET = False


def quiet() -> None:
    """Ray's own INFO and WARNING lines off (the command line says what it does itself)."""
    global _QUIET
    _QUIET = True


def _silence() -> None:
    # Ray sets its loggers up when it starts and when Ray Data starts a dataset; after both.
    # Its ERROR lines too: a failed actor reaches the user as onnxlrp's one line (user_error).
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


#: the last line of an OnnxLrpError's traceback (or of a subclass's), as Ray passes the text of
#: an actor's error: the last resort of user_error, where no exception object came back
_REMOTE_ERROR = re.compile(rf"^{re.escape(OnnxLrpError.__module__)}\.(\w+): (.+)$", re.MULTILINE)


def user_error(exc: BaseException) -> OnnxLrpError | None:
    """The OnnxLrpError an actor raised (an unreadable image, ...) inside the error Ray raises
    for it, of its own class; None for any other failure.

    Ray's error chain is read as objects first: a RayTaskError's ``cause`` is the exception
    the task raised (the driver may get it as a "dual" exception, an instance of both, whose
    text is the traceback: its cause is what the user reads); an ActorDiedError's ``cause`` is
    the RayTaskError of a constructor that raised; Ray Data chains its UserCodeException to
    those by ``__cause__`` (explicit chains only: an error merely raised while another was
    handled is not its cause). Only where no object carries it (an error that crossed as
    text) is the traceback's last line read."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        cause = getattr(error, "cause", None)  # Ray's wrappers: RayTaskError, ActorDiedError
        if isinstance(error, OnnxLrpError) and not isinstance(cause, BaseException):
            return error
        if isinstance(cause, BaseException):
            todo.append(cause)
        todo.append(error.__cause__)
    match = _REMOTE_ERROR.search(str(exc))
    if match is None:
        return None
    from .. import errors

    kind = getattr(errors, match.group(1), None)
    kind = kind if isinstance(kind, type) and issubclass(kind, OnnxLrpError) else OnnxLrpError
    return kind(match.group(2))


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ClusterError(f"ray is not installed: {INSTALL}") from None
    return ray


@contextmanager
def connected(cluster: Cluster) -> Iterator[Any]:
    """Ray, initialised for `cluster`; a local instance started here is shut down after."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if cluster.address not in (None, "auto"):
            _reachable(cluster.address)
        try:
            level = logging.ERROR if _QUIET else logging.INFO
            if cluster.address is not None:
                ray.init(address=cluster.address, log_to_driver=False, logging_level=level)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=level)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at {cluster.address}" if cluster.address else "start a local Ray instance"
            raise ClusterError(f"cannot {where} ({first_line(exc)})") from None
        started = True
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # onnxlrp draws its own
        if _QUIET:
            import ray.data._internal.logging  # noqa: F401 (Ray Data's logging setup, before we quiet it)

            _silence()
        yield ray
    except Exception as exc:
        error = user_error(exc)  # bad input met by an actor: its one line, as in one process
        if error is None:
            raise
        raise error from None
    finally:
        if started:
            ray.shutdown()


def _reachable(address: str, seconds: float = 5.0) -> None:
    """A one-line error for a cluster address nothing answers at (Ray itself retries for minutes)."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address '{address}': expected 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc.strerror or type(exc).__name__}); "
                           "is `ray start --head` running there?") from None


def actor_resources(ray, cluster: Cluster, device: str) -> dict[str, float]:
    """A GPU each on cuda; on the CPU the cluster's CPUs shared among the actors, but no more
    than one machine has (an actor's threads share one machine)."""
    if device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    total = int(ray.cluster_resources().get("CPU", 1))
    node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    return {"num_cpus": max(1, min(node, total // cluster.concurrency))}


def assigned_threads(device: str) -> int | None:
    """In a Ray actor: onnxruntime's intra-op threads, the CPUs Ray assigned to it (None on a
    GPU, or outside an actor: onnxruntime's own choice)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus and device == "cpu" else None


class _Worker:
    """One Ray actor: the job's worker, opened once with the CPUs Ray assigned to it."""

    def __init__(self, job: Job, device: str):
        self.run = job.open(device, assigned_threads(device))

    def __call__(self, rows: dict) -> dict:
        return {"index": rows["index"], "result": [pickle.dumps(self.run(pickle.loads(b))) for b in rows["batch"]]}


def map_batches(job: Job, batches: Sequence[Any], cluster: Cluster, device: str = "cpu",
                progress: Callable[[int], None] | None = None, size: Callable[[Any], int] = len) -> list[Any]:
    """Each batch through `job` on Ray actors; the results in the order of `batches`.
    progress(n) is called as batches finish, n = size(batch)."""
    done: dict[int, Any] = {}

    def keep(index: int, result: Any) -> None:
        done[index] = result
        if progress is not None:
            progress(size(batches[index]))

    stream_batches(job, batches, cluster, device, keep)
    return [done[k] for k in range(len(batches))]


def stream_batches(job: Job, batches: Sequence[Any], cluster: Cluster, device: str,
                   on_result: Callable[[int, Any], None]) -> None:
    """Each batch through `job` on Ray actors; on_result(index, result) as each one finishes,
    in the order they finish (nothing is kept here: a fold over the results needs no memory
    per batch)."""
    if not batches:
        return
    seen: set[int] = set()
    with connected(cluster) as ray:
        items = [{"index": k, "batch": pickle.dumps(b)} for k, b in enumerate(batches)]
        # One batch per block and per call: every actor gets work, and a batch is never cut.
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            _Worker, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(cluster.concurrency, len(items))),
            fn_constructor_kwargs={"job": job, "device": device}, **actor_resources(ray, cluster, device),
        )
        for row in results.iter_rows():  # streamed: Ray's back-pressure bounds what is in flight
            index = int(row["index"])
            seen.add(index)
            on_result(index, pickle.loads(row["result"]))
    missing = len(batches) - len(seen)
    if missing:
        raise ClusterError(f"Ray returned no result for {missing} batch(es)")


def batches_of(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    """`items` in runs of batch_size: the one cut that the single-process commands and their Ray
    runs share, so that onnxruntime sees the same batches either way."""
    return [items[k:k + batch_size] for k in range(0, len(items), max(1, batch_size))]


