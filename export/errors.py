"""The two kinds of error `python -m export` tells apart, and errors as the one line the CLI prints.

Exit codes (docs/export.md): 0 published (or verified), 1 a check failed (nothing published, the
failing step named), 2 bad input of the user (BadInput: one line, nothing written), 3 an internal
error (InternalError, or any exception that is not the user's input: a bug in the fold, merge or
quantizer; one line that says so and where the traceback is, nothing published)."""


class BadInput(ValueError):
    """The user's model, weights, graph or flags cannot be exported as given; the message says
    which and why in one line. The CLI prints it and exits 2 without writing anything."""


class InternalError(RuntimeError):
    """A bug in bnfold, not the user's input: an invariant of the fold, merge or quantizer broke.
    The CLI exits 3 with one line naming the file that holds the traceback; nothing is published."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error message, whitespace collapsed, at most `limit` chars."""
    text = str(error)
    first = next((line for line in text.splitlines() if line.strip()), "") or type(error).__name__
    first = " ".join(first.split())
    return first if len(first) <= limit else first[:limit - 1] + "…"
