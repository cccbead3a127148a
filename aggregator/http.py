"""Health probe and Prometheus metrics over HTTP (aiohttp)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from aggregator.metrics import AggregatorMetrics

HealthCheck = Callable[[], Awaitable[dict[str, object]]]


async def start_http(
    metrics: AggregatorMetrics, health: HealthCheck, host: str, port: int
) -> web.AppRunner:
    """Serve ``/healthz`` (200 when healthy, else 503, JSON) and ``/metrics``."""

    async def healthz(_: web.Request) -> web.Response:
        status = await health()
        return web.json_response(status, status=200 if status.get("ok") else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
