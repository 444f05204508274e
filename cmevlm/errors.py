"""The project's own errors: what a user can fix, and what `cmevlm` reports as a message with
exit code 2 instead of a traceback. Anything else is a bug and is shown as one."""

from __future__ import annotations


class CmevlmError(Exception):
    """An error the user can fix (a config, a missing input, a bad file)."""


class ConfigError(CmevlmError, ValueError):
    """A config that cannot be used; the message says which key and why."""


class MissingInput(CmevlmError, FileNotFoundError):
    """What a stage needs is not there (yet): the message names it and the command that makes it."""


class BadFile(CmevlmError, ValueError):
    """A file the user gave or edited cannot be read (a reviews file, an expert sheet)."""
