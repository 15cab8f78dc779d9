"""The one exception type the request path raises for a client mistake.

Every handler turns it into `{"error": message}` with its status; anything else is a server bug.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request the client got wrong: carries the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ClientError:
    return ClientError(400, message)


def unprocessable(message: str) -> ClientError:
    return ClientError(422, message)


def too_large(message: str) -> ClientError:
    return ClientError(413, message)


def unsupported_media(message: str) -> ClientError:
    return ClientError(415, message)
