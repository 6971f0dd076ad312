"""Errors a user can cause; the CLI prints the message (file/record and reason) and exits 2."""


class MmpipeError(Exception):
    """Base of every user-facing mmpipe error."""


class InputError(MmpipeError):
    """Bad user input: a missing file or column, an unparseable file, an impossible setting."""


class ValidationFailed(MmpipeError):
    """Strict ingest: the first rejected record stops the stage."""


class InvariantBroken(RuntimeError):
    """An accounting identity of a stage does not hold: a bug in mmpipe, never bad input."""


def check(condition: bool, message: str) -> None:
    """Raise InvariantBroken(message) unless ``condition`` (unlike ``assert``, also under -O)."""
    if not condition:
        raise InvariantBroken(message)
