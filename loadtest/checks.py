"""Pure rules shared by the locustfile and the runners: where load may go, what counts as failing.

Kept free of locust and gevent so the rules can be unit-tested and imported by the runners.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Prefix of every failure message the locustfile records for a 4xx answer. A 4xx is the server
# correctly refusing a request (our fault as a client), not the server failing, so thresholds
# ignore it; every other failure (5xx, wrong label, bad shape, connection error) fails the run.
CLIENT_ERROR_TAG = "[4xx]"

MAX_USERS = 512
MAX_RUN_SECONDS = 2 * 60 * 60


class LoadTargetError(ValueError):
    """The requested load test is outside what this harness may do."""


def require_local_host(url: str) -> str:
    """Return ``url`` if it points at this machine; load tests never leave localhost."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadTargetError(f"host must look like http://127.0.0.1:3000, got {url!r}")
    host = parts.hostname
    if host == "localhost":
        return url
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError as e:
            raise LoadTargetError(f"cannot resolve {host!r}: {e}") from e
    if not address.is_loopback:
        raise LoadTargetError(f"refusing to load {host}: load tests only target localhost / 127.0.0.1")
    return url


def parse_duration(text: str) -> float:
    """Seconds in a locust-style duration: ``90``, ``90s``, ``10m``, ``1h30m``."""
    text = str(text).strip().lower()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number = ""
        else:
            raise ValueError(f"bad duration {text!r}; use e.g. 30s, 10m, 1h")
    if number:
        raise ValueError(f"bad duration {text!r}: number without unit at the end")
    return total


def check_bounds(users: int, run_seconds: float) -> None:
    if not 1 <= users <= MAX_USERS:
        raise LoadTargetError(f"users must be 1..{MAX_USERS}, got {users}")
    if not 0 < run_seconds <= MAX_RUN_SECONDS:
        raise LoadTargetError(f"run time must be in (0, {MAX_RUN_SECONDS}] s, got {run_seconds}")


def is_client_error(error_text: str) -> bool:
    return CLIENT_ERROR_TAG in error_text


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]
    requests: int
    server_failures: int
    client_errors: int
    p99_ms: float


def judge(requests: int, errors: list[tuple[str, int]], p99_ms: float, p99_limit_ms: float | None) -> Verdict:
    """Pass/fail of a run from its totals and ``(error text, occurrences)`` pairs."""
    server_failures = sum(n for text, n in errors if not is_client_error(text))
    client_errors = sum(n for text, n in errors if is_client_error(text))
    reasons = []
    if requests == 0:
        reasons.append("no request was made")
    if server_failures:
        reasons.append(f"{server_failures} non-4xx failure(s)")
    if p99_limit_ms is not None and (math.isnan(p99_ms) or p99_ms > p99_limit_ms):
        reasons.append(f"p99 {p99_ms:.0f} ms > limit {p99_limit_ms:g} ms")
    return Verdict(not reasons, reasons, requests, server_failures, client_errors, p99_ms)
