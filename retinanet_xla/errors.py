"""Every way a command can end other than success, with the exit code docs/checkpoints.md
promises. The bottom layer: it imports nothing of the package, so any module can raise these,
and the command line maps them to exit codes without being asked which errors are whose.

- ``UserError`` (exit 2): a mistake the user can fix (a config key, a file, a dataset), reported
  as one line without a traceback. Its kinds say where the mistake is.
- ``RunStopped`` (exit 75, EX_TEMPFAIL "try again"): a stop was requested and a checkpoint
  saved; running the same command again resumes.
- ``RunFailed`` (exit 1): the run could not go on (the loss diverged, a replica died); what was
  saved before is intact.
"""

import reprlib
import signal

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75


class UserError(ValueError):
    """A user mistake; the message is one line naming the file, key or value and what is expected."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """A config file, ``--set`` override or command-line option."""


class DatasetError(UserError):
    """An annotation file or image directory."""


class CheckpointError(UserError):
    """A checkpoint file or run directory."""


# The signals that ask a run to stop (a Cloud TPU VM's preemption notice, Ctrl-C): the launcher
# turns them into a stop request, and data-loading workers leave them to their parent.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(RuntimeError):
    """A stop was requested (SIGTERM/SIGINT, the STOP file); a checkpoint for the step reached was saved."""

    exit_code = EXIT_INTERRUPTED


class RunFailed(RuntimeError):
    """The run could not go on; checkpoints already written are intact."""

    exit_code = EXIT_FAILED


# A value a message quotes, in one short line whatever it is: a YAML alias bomb of a few hundred
# bytes expands to billions of items only when printed in full, which takes gigabytes and minutes.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 80, 40, 80


def shown(value) -> str:
    """``repr(value)``, shortened: nested at most 2 deep, 6 items, 120 characters in all."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def require_package(module: str, needed_by: str, extra: str) -> None:
    """``ConfigError`` in one line naming the extra to install when ``module`` cannot be
    imported, checked before the work that needs it starts (not a traceback in the middle)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{needed_by} needs {module}, which is not installed: pip install 'retinanet-xla[{extra}]'") from None
