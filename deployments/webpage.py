"""The web page's files (deployments/web/: plain HTML/JS/CSS, no build step) as the Ingress serves them:
`/` is index.html, `/web/{name}` one of a fixed set of assets (nothing else under the folder is reachable).
Both need no API key (security.py): the page holds no secret; it sends the key the user types."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# Same-origin only; blob: for the MSE video and the JPEG frames; the batch tab's result link is a plain link.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP}


def web_file(name: str = "index.html") -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no page asset {name}")
    return FileResponse(WEB_DIR / name, media_type=ASSETS[name], headers=HEADERS)
