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
    }
)


def make_app(backend: str) -> web.Application:
    """The proxy application forwarding every path to C{backend}."""
    app = web.Application()
    # A closure rather than app["session"]: string app keys warn on new aiohttp.
    sessions: list[ClientSession] = []

    async def start(app: web.Application) -> None:
        # limit=0: no cap on pooled keep-alive connections, like the Go reference.
        sessions.append(
            ClientSession(
                connector=TCPConnector(limit=0, limit_per_host=0),
                auto_decompress=False,
                # Forward the client's headers as they are, adding none.
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        )

    async def stop(app: web.Application) -> None:
        await sessions[0].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        # Content-Length passes through so an upload stays un-chunked upstream.
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = request.content if request.can_read_body else None
        async with sessions[0].request(
            request.method,
            backend + request.rel_url.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
                },
            )
            # Set through the property: StreamResponse then skips chunking.
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
