"""The one route table: `@route(...)` on a service method declares its path, method and docs; the
`Router` ASGI middleware (added to the BentoML service) answers those routes and hands everything
else (BentoML's /livez, /healthz, /metrics, its Swagger assets) to BentoML's own router.

Why a middleware and not typed `@bentoml.api` methods or a mounted Starlette app: measured on the
same trivial handler, 1 worker (docs/service.md, "Request path"): 0.28 ms of server CPU per request
through a middleware, 0.46 ms through a mounted app (BentoML's router scan plus the app's own stack),
0.62 ms through a typed API (pydantic, its request wrapper and context). The middleware sits inside
BentoML's metrics, tracing and timeout middlewares, so /metrics still counts every answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .errors import ClientError
from .guard import PROTOCOL

logger = logging.getLogger("bentoml.service.routing")

JSON = "application/json"
BODY_READ = "bnfold.body_read"  # scope key set once a handler has read the whole request body
# Paths BentoML itself serves behind the router (a 404 for anything else is ours, in JSON).
BENTOML_PATHS = frozenset({"/livez", "/healthz", "/metrics"})
BENTOML_PREFIXES = ("/static_content/",)


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # segments like {name} are path parameters
    handler: str  # the service method's name
    summary: str
    body: dict[str, str] = field(default_factory=dict)  # content type -> schema name (docs.py)
    answers: dict[int, str] = field(default_factory=dict)  # status -> schema name or description
    produces: str = JSON
    client_input: dict | None = None  # its input in BentoML's client schema: listed in /schema.json
    work: bool = False  # runs the model: counted in the queue, shed under overload (service/guard.py)
    tag: str = "model"

    @property
    def client(self) -> bool:
        return self.client_input is not None


def route(method: str, path: str, summary: str, **kwargs: Any):
    """Mark a service method as the handler of `method path` (async, takes a Request)."""

    def mark(fn):
        fn.__route__ = Route(method, path, fn.__name__, summary, **kwargs)
        return fn

    return mark


def routes_of(cls) -> tuple[Route, ...]:
    return tuple(fn.__route__ for fn in vars(cls).values() if hasattr(fn, "__route__"))


def work_matcher(routes: tuple[Route, ...]):
    """(method, path as bytes) -> does it run the model? From the routes marked `work=True`, so a new
    model route cannot miss load shedding."""
    router = Router(None, tuple(r for r in routes if r.work))

    def is_work(method: bytes, path: bytes) -> bool:
        try:
            m, p = method.decode("ascii"), path.decode("ascii")
        except UnicodeDecodeError:
            return False
        return (m, p) in router.fixed or router.match(m, p)[0] is not None

    return is_work


def json_response(content: object, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON)


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


class Router:
    """ASGI middleware over BentoML's app: dispatches the service's routes to its instance."""

    def __init__(self, app, routes: tuple[Route, ...]) -> None:
        self.app = app
        self.fixed = {(r.method, r.path): r for r in routes if "{" not in r.path}
        self.templated = [(r, r.path.split("/")) for r in routes if "{" in r.path]
        self.methods: dict[str, set[str]] = {}
        for r in routes:
            self.methods.setdefault(r.path, set()).add(r.method)

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], set[str]]:
        """(route, path params, allowed methods of a path that exists)."""
        parts = path.split("/")
        allowed: set[str] = set()
        for r, pattern in self.templated:
            if len(pattern) != len(parts):
                continue
            params = {}
            for want, got in zip(pattern, parts):
                if want.startswith("{"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                if r.method == method:
                    return r, params, allowed
                allowed.add(r.method)
        return None, {}, allowed | self.methods.get(path, set())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        r = self.fixed.get((method, path))
        if r is None:
            if path in BENTOML_PATHS or path.startswith(BENTOML_PREFIXES):
                await self.app(scope, receive, send)
                return
            r, params, allowed = self.match(method, path)
            if r is None:
                if allowed:
                    response = error_response(405, f"{method} is not allowed on {path}; use {', '.join(sorted(allowed))}",
                                              {"allow": ", ".join(sorted(allowed))})
                else:
                    response = error_response(404, f"no route {path}; see /docs for the API")
                await response(scope, receive, send)
                return
            scope["path_params"] = params
        await self.dispatch(r, scope, receive, send)

    async def dispatch(self, r: Route, scope, receive, send) -> None:
        import bentoml

        service = bentoml.get_current_service()
        request = Request(scope, receive)
        try:
            response = await getattr(service, r.handler)(request)
        except ClientError as exc:
            response = error_response(exc.status, exc.message)
        except ClientDisconnect:  # the client left (or its stalled body was closed, 408): nothing reaches it, but
            # an answer must still be sent: BentoML's TimeoutMiddleware waits for one, and its request would count
            # as in flight (and be shed against) until the traffic timeout. 499: nginx's "client closed request".
            logger.info("client went away during %s %s", scope["method"], scope["path"])
            response = error_response(499, "client went away")
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal server error; see the server log")
        # Answered before the request body was read (a refusal): close instead of reading it.
        # Draining after SIGTERM: every answer closes its connection, so clients move elsewhere.
        # This worker holds more than its share of connections: this client reconnects, to another
        # worker (service/workers.py).
        if ((scope["method"] == "POST" and not scope.get(BODY_READ)) or service.guard.draining
                or service.guard.should_move(scope.get(PROTOCOL))):
            response.headers["connection"] = "close"
        await response(scope, receive, send)
