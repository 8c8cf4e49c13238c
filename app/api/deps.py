"""Request dependencies: a session, the dispatcher, the registry, and the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.api.auth import Authenticator
from app.errors import Forbidden
from app.jobs.dispatch import Dispatcher
from app.jobs.registry import Registry
from app.jobs.service import Principal
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


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.conveyor
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def get_dispatcher(state: StateDep) -> Dispatcher:
    return state.dispatcher


def get_registry(state: StateDep) -> Registry:
    return state.registry


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
RegistryDep = Annotated[Registry, Depends(get_registry)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <secret>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <secret>`")


async def get_principal(
    state: StateDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Principal:
    secret = bearer.credentials if bearer is not None else api_key
    await state.auth.ready()
    return state.auth.authenticate(secret)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.admin:
        raise Forbidden("this operation needs an admin key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
