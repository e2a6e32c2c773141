"""How log records reach the user: one line each on stderr, this package's own at INFO and up
(a resume, a moved run: news, not warnings), everybody else's at WARNING and up.

Set by the command line at start, and again by every replica process it spawns (a spawned
interpreter starts with logging unconfigured)."""

import logging


def _one_line(record: logging.LogRecord) -> bool:
    """A storage back-end's failure as one warning line: the error it ends in is ours, in one
    line (storage.py), and its tracebacks said nothing more."""
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    if record.levelno > logging.WARNING:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("retinanet_xla").setLevel(logging.INFO)
    gcsfs = logging.getLogger("gcsfs")
    if _one_line not in gcsfs.filters:
        gcsfs.addFilter(_one_line)
