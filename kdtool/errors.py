"""Errors that carry an exit code, and a tiny name -> thing registry that names valid choices.

The library raises these; the CLI turns them into one-line messages (exit 2 for bad input,
exit 1 for a failed check) and shows the traceback only with ``--debug``.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, Mapping, Optional, TypeVar

T = TypeVar("T")


class KdtoolError(Exception):
    """Bad input (recipe, path, checkpoint, bundle): the CLI exits 2 with this message."""

    exit_code = 2


class CheckFailed(KdtoolError):
    """A check failed (verification mismatch, accuracy gate missed, non-finite loss): exit 1."""

    exit_code = 1


class Interrupted(KdtoolError):
    """Stopped by SIGINT or SIGTERM: the CLI exits 128 + the signal number (130, 143) with this message."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def describe_error(error: Mapping) -> str:
    """One pydantic error as 'key.path: message'."""
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message[:1].lower() + message[1:]}"


def validation_message(exc, describe: Optional[Callable[[Mapping], str]] = None) -> str:
    """A pydantic ``ValidationError`` on one line: its first error (through `describe`, default
    `describe_error`) and how many more there are. The one formatter of validation errors in kdtool."""
    describe = describe or describe_error
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{describe(exc.errors(include_url=False)[0])}{more}"


class Registry(Generic[T], Mapping[str, T]):
    """A read-only name -> entry mapping whose lookup error lists the known names."""

    def __init__(self, kind: str, entries: Mapping[str, T]):
        self.kind = kind
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise KdtoolError(
                f"unknown {self.kind} {name!r}{closest(name, self._entries)}; known: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:  # Mapping's would call __getitem__, which raises KdtoolError
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
