"""The browser UI, served by the service itself: one page, its script and its style sheet, from
the files beside this module (no CDN, no build step). They hold no scores, so they need no token:
the page tells the script whether the service wants one, the script asks for it once, keeps it
in the tab's session storage and sends it as a bearer header on every API call, never in a URL.
A strict Content-Security-Policy keeps the page to the service's own script, style and data.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

UI_FOLDER = Path(__file__).with_name("ui")
ASSETS = {  # path -> (file, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
}
PUBLIC_PATHS = frozenset(ASSETS)  # besides /healthz, the paths that need no token
AUTH_PLACEHOLDER = b"{{AUTH}}"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(body: bytes, media_type: str):
    async def serve_asset() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve_asset


def build_ui_routes(*, token_required: bool) -> APIRouter:
    """GET routes of the UI's files (left out of the OpenAPI document)."""
    router = APIRouter(include_in_schema=False)
    for path, (file, media_type) in ASSETS.items():
        body = (UI_FOLDER / file).read_bytes().replace(
            AUTH_PLACEHOLDER, b"bearer" if token_required else b"none")
        router.add_api_route(path, _asset(body, media_type), methods=["GET"],
                             name=f"ui:{file}")
    return router
