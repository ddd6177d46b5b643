"""Errors a user can act on. The CLI prints them as one line, never a traceback."""


class IfediclError(Exception):
    """Base class for every error the project raises on purpose."""


class DataError(IfediclError):
    """Bad or missing task data (unknown dir, bad label, empty text)."""


class TaskSpecError(IfediclError):
    """A task definition that cannot work with this tokenizer or these labels."""


class FederationError(IfediclError):
    """The federation could not complete (too few clients answered, ...)."""
