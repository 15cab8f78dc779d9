"""Bad input to `python -m export`, and errors as the one line the CLI prints."""


class BadInput(ValueError):
    """The user's model, weights, graph or flags cannot be exported as given; the message says
    which and why in one line. The CLI prints it and exits 2 without writing anything."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error message, whitespace collapsed, at most `limit` chars."""
    text = str(error)
    first = next((line for line in text.splitlines() if line.strip()), "") or type(error).__name__
    first = " ".join(first.split())
    return first if len(first) <= limit else first[:limit - 1] + "…"
