"""Request dependencies: a session, the dispatcher, the registry, and the caller.

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
hop per request. The submit routes, the hottest, skip dependency solving altogether and call
:func:`state_of` and :func:`principal_of` on the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.api.auth import Authenticator
from app.api.gate import PRINCIPAL
from app.errors import Forbidden, Unauthenticated
from app.jobs.dispatch import Dispatcher
from app.jobs.intake import Intake
from app.jobs.principal import Principal
from app.jobs.registry import Registry
from app.jobs.watch import Watch
from app.observe.snapshot import Snapshots
from app.settings import Settings
from app.streams.client import StreamClient


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    stream: StreamClient
    dispatcher: Dispatcher
    registry: Registry
    auth: Authenticator
    intake: Intake
    watch: Watch
    snapshots: Snapshots | None = None  # the metrics snapshot cache (set by the lifespan)


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


async def get_state(request: Request) -> AppState:
    return state_of(request)


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_dispatcher(state: StateDep) -> Dispatcher:
    return state.dispatcher


async def get_registry(state: StateDep) -> Registry:
    return state.registry


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
RegistryDep = Annotated[Registry, Depends(get_registry)]


def principal_of(request: Request) -> Principal:
    """The caller, as the gate authenticated it (:mod:`app.api.gate`)."""
    principal: Principal | None = request.scope.get(PRINCIPAL)
    if principal is None:  # not under /v1: the gate did not look
        raise Unauthenticated("missing API key")
    return principal


async def get_principal(request: Request) -> Principal:
    return principal_of(request)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.admin:
        raise Forbidden("this operation needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
