"""Do-nothing ``/predict``: reads the request body and returns a canned one-image answer.

It never decodes the JSON or runs a model, so its throughput is what the load generator itself can
push through HTTP on this machine: the ceiling any real server is measured against. A raw ASGI app
on uvicorn (httptools, uvloop when present) keeps the server's share of the CPU as small as it gets.

    python -m loadtest.baselines.do_nothing --port 3002
    python -m loadtest.baselines.do_nothing --port 3002 --fastapi   # the same answer from FastAPI
    python -m loadtest.baselines.do_nothing --port 3002 --delay-ms 30  # a slow server, for tests

The FastAPI variant is the "do-nothing FastAPI endpoint" of the issues' prototype: the ceiling of
a Python web framework on this machine rather than of the load generator.
"""


import argparse
import asyncio
import json

ANSWER = json.dumps(
    {"predictions": [{"label": "T-shirt/top", "class_id": 0, "probabilities": [0.1] * 10}]},
    separators=(",", ":"),
).encode()
# A known latency floor for tests of the p99 threshold: locust rounds sub-millisecond response
# times to 0 ms, so "p99 over the limit" can only be tested against a server known to be slow.
DELAY_S = 0.0  # set from --delay-ms
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # drain the body, as any real server must
        message = await receive()
        more = message.get("more_body", False)
    if DELAY_S:
        await asyncio.sleep(DELAY_S)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def fastapi_app():
    from fastapi import FastAPI, Request, Response

    api = FastAPI()

    @api.get("/readyz")  # what the harness polls before it starts the load
    async def readyz() -> Response:
        return Response(b"ready")

    @api.post("/predict")
    async def predict(request: Request) -> Response:
        await request.body()
        if DELAY_S:
            await asyncio.sleep(DELAY_S)
        return Response(ANSWER, media_type="application/json")

    return api


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3002)
    ap.add_argument("--fastapi", action="store_true", help="serve the canned answer from a FastAPI route")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="wait this long before each answer (tests)")
    args = ap.parse_args()
    global DELAY_S
    DELAY_S = max(args.delay_ms, 0.0) / 1000.0
    import uvicorn

    uvicorn.run(fastapi_app() if args.fastapi else app, host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
