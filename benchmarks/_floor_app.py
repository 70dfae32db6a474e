"""The framework floor for benchmarks/proxy.py: a Starlette app on uvicorn
that answers every POST with fixed bytes, as the proxy's hit path does.

    python benchmarks/_floor_app.py PORT ANSWER_FILE
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

with open(sys.argv[2], "rb") as f:
    ANSWER = f.read()


async def chat(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json", headers={"x-aiollmcache": "hit-memory"})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, lifespan="off"
    )
