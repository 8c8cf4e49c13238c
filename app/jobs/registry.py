"""Job types: ``@job_type("demo.echo")`` ties a name to a payload model and an async handler.

The API validates payloads with the model and publishes its JSON Schema; workers call the
handler. Both load the same modules (``Settings.handler_module_list``: the built-in types'
package, then those of ``CONVEYOR_HANDLER_MODULES``), so they agree.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, get_type_hints
from uuid import UUID

from pydantic import BaseModel, ValidationError

from app.errors import InvalidInput
from app.flow.limits import NO_LIMITS, Limits
from app.jobs.status import TERMINAL, JobStatus
from app.schedules.spec import Periodic
from app.settings import MAX_RETENTION_SECONDS

Json = Any
PayloadT = TypeVar("PayloadT", bound=BaseModel)
PayloadT_contra = TypeVar("PayloadT_contra", bound=BaseModel, contravariant=True)


MAX_PROGRESS_MESSAGE = 500  # characters; a longer message is cut

ProgressSink = Callable[[float, str | None], None]


@dataclass(frozen=True)
class JobContext:
    """What a handler may know about the attempt it runs in."""

    job_id: UUID
    type: str
    queue: str
    attempt: int
    max_attempts: int
    worker: str
    # Set by the worker when a cancel of this job was requested (before it cancels the task).
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once a cancel of this job was requested: a long loop may check it and stop.
        The handler's task is cancelled too (``CancelledError`` at its next ``await``); it may
        catch that to clean up, within ``CONVEYOR_CANCEL_GRACE_SECONDS``."""
        return self.cancel_event.is_set()

    progress_sink: ProgressSink | None = field(default=None, repr=False, compare=False)

    async def progress(self, value: float, message: str | None = None) -> None:
        """Report how far the attempt got: ``value`` from 0 to 1, and an optional message (cut
        to 500 characters). Returns at once: the worker writes the latest value of each job
        a few times a second at most, fenced like every write of the attempt; a value reported
        just before the handler returns may be superseded by the outcome unwritten.

        Raises ``ValueError`` for a value outside 0..1 (or not a number)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("progress value must be a number from 0 to 1")
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError("progress value must be a number from 0 to 1")
        if message is not None:
            message = str(message)[:MAX_PROGRESS_MESSAGE]
        if self.progress_sink is not None:
            self.progress_sink(float(value), message)


class Handler(Protocol[PayloadT_contra]):
    def __call__(self, payload: PayloadT_contra, ctx: JobContext, /) -> Awaitable[Json]: ...


@dataclass(frozen=True)
class JobType:
    name: str
    model: type[BaseModel]
    handler: Callable[[Any, JobContext], Awaitable[Json]]
    timeout_seconds: float | None
    description: str
    schedule: Periodic | None = None  # runs by itself; synced to `schedules` at worker start
    limits: Limits = NO_LIMITS  # declared; an override over HTTP replaces them (app.flow)
    # Seconds a finished job of this type is kept, per terminal status (0: forever); the
    # statuses not named here keep CONVEYOR_RETENTION_<STATUS>_SECONDS (app.jobs.retention).
    retention: Mapping[JobStatus, float] = field(default_factory=dict)

    def validate(self, payload: Any) -> BaseModel:
        try:
            return self.model.model_validate(payload)
        except ValidationError as exc:
            raise InvalidInput(
                f"payload does not match the schema of {self.name!r}",
                details=exc.errors(include_url=False, include_context=False, include_input=False),
            ) from exc

    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()


class Registry:
    def __init__(self) -> None:
        self._types: dict[str, JobType] = {}

    def register(self, job: JobType) -> None:
        existing = self._types.get(job.name)
        if existing is not None and existing.handler is not job.handler:
            raise ValueError(f"job type {job.name!r} is registered twice")
        self._types[job.name] = job

    def get(self, name: str) -> JobType:
        try:
            return self._types[name]
        except KeyError:
            raise InvalidInput(
                f"unknown job type {name!r}", details={"known": sorted(self._types)}
            ) from None

    def find(self, name: str) -> JobType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def all(self) -> list[JobType]:
        return [self._types[k] for k in sorted(self._types)]


REGISTRY = Registry()


def job_type(
    name: str,
    *,
    timeout_seconds: float | None = None,
    schedule: str | Periodic | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    burst: int | None = None,
    retention: Mapping[str, float] | None = None,
) -> Callable[[Handler[PayloadT]], Handler[PayloadT]]:
    """Register an async handler whose first parameter is annotated with its payload model.

    ``schedule`` (a cron expression, or :class:`Periodic` for a payload, time zone, queue...)
    makes the type run by itself: a schedule named after the type, synced at worker start.

    ``concurrency`` (at most N running at once) and ``rate`` (``"N/s"``, ``"N/m"``, ``"N/h"``,
    with up to ``burst`` starts at once, default N) hold across all workers; an operator may
    override them at run time (``PUT /v1/job-types/{type}/limits``).

    ``retention`` (``{"succeeded": 3600, "dead": 0}``: seconds per terminal status, 0 keeps
    forever) overrides the CONVEYOR_RETENTION_* settings for this type's finished jobs.
    """
    try:
        limits = Limits.declare(concurrency=concurrency, rate=rate, burst=burst)
    except ValueError as exc:
        raise ValueError(f"limits of {name!r}: {exc}") from None
    periodic = Periodic(schedule) if isinstance(schedule, str) else schedule
    if periodic is not None:
        periodic.check(name)
    kept = _retention(name, retention or {})

    def decorate(fn: Handler[PayloadT]) -> Handler[PayloadT]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"handler of {name!r} must be an async function")
        hints = get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
        model = hints.get(params[0]) if params else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"the first parameter of {name!r} needs a pydantic model annotation")
        job = JobType(
            name=name,
            model=model,
            handler=fn,
            timeout_seconds=timeout_seconds,
            description=inspect.getdoc(fn) or "",
            schedule=periodic,
            limits=limits,
            retention=kept,
        )
        if periodic is not None:
            try:
                job.validate(periodic.payload)
            except InvalidInput as exc:
                raise ValueError(f"schedule of {name!r}: {exc.message}") from None
        REGISTRY.register(job)
        return fn

    return decorate


def _retention(name: str, retention: Mapping[str, float]) -> dict[JobStatus, float]:
    kept: dict[JobStatus, float] = {}
    for status, seconds in retention.items():
        if status not in {s.value for s in TERMINAL}:
            raise ValueError(f"retention of {name!r}: {status!r} is not a terminal status")
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not 0 <= seconds <= MAX_RETENTION_SECONDS
        ):
            raise ValueError(f"retention of {name!r}: {status} needs 0 to 100 years in seconds")
        kept[JobStatus(status)] = float(seconds)
    return kept


def load_handlers(modules: Iterable[str]) -> Registry:
    """Import the handler modules (``Settings.handler_module_list``) and return the registry."""
    for module in modules:
        importlib.import_module(module)
    return REGISTRY
