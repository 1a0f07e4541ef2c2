"""The intake baseline: a bare Starlette app that checks GitHub's HMAC and answers 202.

Nothing else happens: no parsing, no storage, no logging. It is served by uvicorn
with the same defaults `deploybot serve` uses (same event loop and HTTP parser), in
its own process, so the intake benchmark compares the bot's verify + parse + persist
against the floor of the same stack.

    BENCH_WEBHOOK_SECRET=... python -m bench.baseline_app --port 8123
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(secret: bytes) -> Starlette:
    async def webhook(request: Request) -> Response:
        body = await request.body()
        header = request.headers.get("x-hub-signature-256", "")
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), header.encode()):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        return JSONResponse({"status": "queued"}, status_code=202)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/webhooks/github", webhook, methods=["POST"]),
        Route("/healthz", healthz),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    secret = os.environ["BENCH_WEBHOOK_SECRET"].encode()
    uvicorn.run(create_app(secret), host=args.host, port=args.port, log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
