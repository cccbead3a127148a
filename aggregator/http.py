"""Health probe, Prometheus metrics and the operator's status over HTTP (aiohttp)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from aggregator.metrics import AggregatorMetrics

HealthCheck = Callable[[], Awaitable[dict[str, object]]]
#: The /status document (aggregator/status.py, docs/status.md).
StatusReport = Callable[[], Awaitable[dict[str, object]]]


async def start_http(
    metrics: AggregatorMetrics,
    health: HealthCheck,
    host: str,
    port: int,
    status: StatusReport | None = None,
) -> web.AppRunner:
    """Serve ``/healthz`` (200 when healthy, else 503, JSON), ``/metrics`` and, given
    ``status``, ``/status`` (200, JSON: what ``fedq status`` shows)."""

    async def healthz(_: web.Request) -> web.Response:
        report = await health()
        return web.json_response(report, status=200 if report.get("ok") else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    if status is not None:
        report_status = status

        async def status_page(_: web.Request) -> web.Response:
            return web.json_response(await report_status())

        app.router.add_get("/status", status_page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
