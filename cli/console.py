"""How every ``ifedicl`` command talks to its user: logging to stderr, errors as one line."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool) -> None:
    """``ifedicl`` loggers at INFO (a structured line per round) or WARNING; chatty libraries at ERROR."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("ifedicl").setLevel(logging.INFO)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
