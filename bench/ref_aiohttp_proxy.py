#!/usr/bin/env python3
"""
A minimal aiohttp reverse proxy, a reference the ingress is measured
against: one backend, a keep-alive client pool, bodies streamed both ways,
hop-by-hop headers dropped.  Plain asyncio event loop.

    python3 bench/ref_aiohttp_proxy.py --port 8081 --backend http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse

from aiohttp import ClientSession, TCPConnector, web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def make_app(backend: str) -> web.Application:
    """The proxy application forwarding every path to C{backend}."""
    app = web.Application()

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=0, limit_per_host=0), auto_decompress=False
        )

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = request.content if request.can_read_body else None
        async with app["session"].request(
            request.method,
            backend + request.rel_url.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
                },
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="backend base URL")
    args = parser.parse_args()
    web.run_app(
        make_app(args.backend.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
