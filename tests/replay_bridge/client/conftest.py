"""Small aiohttp servers on loopback ports for the client's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from replay_bridge.client import RolloutClient
from reference_engine.loopback import loopback_app
from replay_bridge.geometry import RoutingGeometry

# Serve an app on a free loopback port until the block exits; yields its base URL.
from reference_engine import serve_app as running


def recording(app: web.Application) -> list[dict[str, Any]]:
    """Record every request body the app receives."""
    bodies: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST":
            bodies.append(orjson.loads(await request.read()))
        return await handler(request)

    app.middlewares.append(record)
    return bodies


@asynccontextmanager
async def loopback_client(engine: str, geometry: RoutingGeometry, **options: Any
                          ) -> AsyncIterator[tuple[RolloutClient, list[dict[str, Any]]]]:
    """A client of the light responder (served in this process), and the request bodies the
    responder has received so far."""
    app = loopback_app(engine, geometry)
    bodies = recording(app)
    async with running(app) as url, RolloutClient(url, engine, geometry, **options) as client:
        yield client, bodies
