"""The API docs, /docs (Swagger UI) and /redoc, served with their assets from this package, so they work offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

# Vendored from npm (versions, sources and licences in app/docs_assets/README.md).
ASSETS_DIR = Path(__file__).parent / "docs_assets"
ASSETS_PATH = "/docs/assets"

# FastAPI's own defaults plus: no validator badge (it would ask validator.swagger.io about our
# schema) and no key kept in localStorage by "Authorize".
SWAGGER_UI_PARAMETERS = {
    "dom_id": "#swagger-ui",
    "layout": "BaseLayout",
    "deepLinking": True,
    "showExtensions": True,
    "showCommonExtensions": True,
    "validatorUrl": None,
    "persistAuthorization": False,
}


# The pages load nothing from other hosts, whatever a schema or a later version of the assets names
# (Redoc 2.5.4 had its logo on a CDN). Their inline start-up scripts need 'unsafe-inline'; Redoc's
# search runs in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
)


def install_docs(app: FastAPI) -> None:
    """Replace FastAPI's /docs and /redoc, which load their scripts from a CDN, with local ones."""
    replaced = {app.docs_url, app.redoc_url}
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in replaced]
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        page.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
        return page

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            with_google_fonts=False,
        )
        page.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
        return page

    app.add_route(app.docs_url or "/docs", swagger_ui, include_in_schema=False)
    app.add_route(app.redoc_url or "/redoc", redoc, include_in_schema=False)
    app.router.routes.append(Mount(ASSETS_PATH, app=StaticFiles(directory=ASSETS_DIR), name="docs-assets"))
