"""GET /dashboard: the live dashboard page (public; its data needs an admin key) and its assets, from this package."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

DIRECTORY = Path(__file__).parent
ASSETS_PATH = "/dashboard/assets"

# Nothing from other hosts, no inline script; its WebSocket goes to this origin ('self' covers ws:).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
)


@cache
def _page() -> str:
    return (DIRECTORY / "index.html").read_text()


async def dashboard(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    headers = {"content-security-policy": CONTENT_SECURITY_POLICY, "cache-control": "no-cache"}
    return HTMLResponse(_page().replace("{{root}}", root), headers=headers)


def install_dashboard(app: FastAPI) -> None:
    """The page and its assets; neither takes a key (audit/middleware.py leaves /dashboard out of the log)."""
    app.add_route("/dashboard", dashboard, include_in_schema=False)
    app.router.routes.append(
        Mount(ASSETS_PATH, app=StaticFiles(directory=DIRECTORY / "assets"), name="dashboard-assets")
    )
