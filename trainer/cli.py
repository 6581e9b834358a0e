"""What every command line of this project shares: its argument parser and its exit codes.

Two rules, for every ``landmarks-*`` command:

- **No flag passes silently.** :class:`ErrorRaisingArgumentParser` never accepts an
  abbreviation (``--crop`` is not ``--crops``) and reports an unknown flag as
  ``unknown flag --blend_weigth (did you mean --blend_weight?)``
  (:func:`unknown_arguments_message`). The Beam jobs add Beam's own flags to the known ones
  (``beam_pipelines.cli``).
- **Errors are told apart by their cause** (:func:`run_command`): bad input is one line and exit
  code 2; a failure with its own meaning (:class:`CommandFailure`, e.g. training diverged) is one
  line and its own code; anything else is a bug: its traceback is logged and the exit code is 1.

This module lives in ``trainer`` because ``trainer`` may not import ``beam_pipelines`` while
``beam_pipelines`` may import ``trainer``; it imports nothing heavy (no TensorFlow).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from typing import Callable, Iterable, Optional, Sequence

from tfrecords_schema import InputError

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 5
"""A resource the run needs (a bucket, a host, a weights URL) could not be reached: the network
or the service, not the user's input and not a bug (:class:`ResourceUnreachable`). Codes 3
(training diverged) and 4 (a job ran but did not do its work) belong to the commands."""

BUG_HINT = "this is a bug, please report it with the traceback above"
BUG_HINT_NO_TRACEBACK = "this is a bug, please report it"


class CommandFailure(RuntimeError):
    """A run that failed for a known reason that is neither bad input nor a bug.

    :func:`run_command` reports it in one ``<prog>: error: ...`` line and returns
    :attr:`exit_code` (subclasses set it, e.g. 3 for a diverged training).
    """

    exit_code = EXIT_INTERNAL_ERROR


class ResourceUnreachable(CommandFailure):
    """A resource the run needs cannot be reached (exit code :data:`EXIT_UNREACHABLE`).

    The message is one line naming the resource (``gs://bucket/path``, a URL, ``host:port``)
    and the cause (``Connection refused``, a DNS failure, a timeout). Raised before any work
    where the command can check, so that the run fails in seconds rather than after minutes of
    retries.
    """

    exit_code = EXIT_UNREACHABLE


# ---------------------------------------------------------------------------------------------
# Flags.


def flag_name(argument: str) -> str:
    """``--name=value`` -> ``--name``; other arguments unchanged."""
    return argument.split("=", 1)[0] if argument.startswith("-") else argument


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag ``parser`` knows (``--name``, ``-h``), in definition order."""
    return [option for action in parser._actions for option in action.option_strings]


def _describe_unknown(argument: str, known_flags: Sequence[str]) -> str:
    name = flag_name(argument)
    if not name.startswith("-"):
        return f"unexpected argument {argument!r}"
    close = difflib.get_close_matches(name, [flag for flag in known_flags if flag != name], n=1)
    suggestion = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown flag {name}{suggestion}"


def unknown_arguments_message(unknown: Sequence[str], known_flags: Iterable[str]) -> str:
    """One line for arguments nobody accepts, e.g. ``unknown flag --crop (did you mean --crops?)``.

    ``unknown`` is what a parser left over (flags and the values that follow them). The flags
    are named, each with the closest of ``known_flags`` (``difflib``) when one is close; a
    value that follows an unknown flag is not reported separately; leftover values without a
    flag before them are ``unexpected argument 'x'``.
    """
    known = sorted(set(known_flags))
    problems, after_unknown_flag = [], False
    for argument in unknown:
        is_flag = argument.startswith("-") and not _looks_like_number(argument)
        if not is_flag and after_unknown_flag:
            after_unknown_flag = False  # the value of the unknown flag before it
            continue
        problems.append(_describe_unknown(argument, known))
        after_unknown_flag = is_flag and "=" not in argument
    return "; ".join(problems)


def parse_bool(text: str) -> bool:
    """A flag's ``true``/``false`` value (also 1/0, yes/no, on/off; any case), for ``type=``."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ErrorRaisingArgumentParser(argparse.ArgumentParser):
    """argparse for the ``landmarks-*`` commands: strict, and raising instead of exiting.

    - ``allow_abbrev`` is always False: a prefix of a flag is an unknown flag, not the flag.
    - :meth:`error` raises :class:`~tfrecords_schema.InputError` instead of printing the usage and
      exiting, so ``main`` reports one line with exit code 2 (:func:`run_command`) and
      ``run(argv)`` callers (tests, the demo) get an exception rather than ``SystemExit``.
    - :meth:`parse_args` reports unknown flags with a suggestion
      (:func:`unknown_arguments_message`), also when they are why a required flag is missing.
    """

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(message)

    def known_flags(self) -> list[str]:
        """Every flag of this parser."""
        return option_strings(self)

    def unknown_flags(self, args: Sequence[str]) -> list[str]:
        """The arguments of ``args`` that look like flags but are none of this parser's."""
        known = set(self.known_flags())
        unknown = []
        for argument in args:
            if argument == "--":
                break
            if (argument.startswith("-") and not _looks_like_number(argument)
                    and flag_name(argument) not in known):
                unknown.append(argument)
        return unknown

    def parse_args(self, args=None, namespace=None):
        """Like argparse's, but an unknown flag is reported first, with a suggestion."""
        args = list(sys.argv[1:] if args is None else args)
        try:
            namespace, extras = self.parse_known_args(args, namespace)
        except InputError:
            # A misspelt flag is the likelier cause of e.g. "the following arguments are required".
            extras = self.unknown_flags(args)
            if not extras:
                raise
        if extras:
            raise InputError(unknown_arguments_message(extras, self.known_flags()))
        return namespace


# ---------------------------------------------------------------------------------------------
# Exit codes.


def first_line(error: BaseException) -> str:
    """The error's message in one line (the first non-empty one, or the type's name).

    An error raised inside a ``tf.function`` starts with ``in user code:``; its message is the
    last line then.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0] == "in user code:":
        return lines[-1]
    return lines[0]


def is_input_error(error: BaseException) -> bool:
    """True for the user's mistakes: :class:`~tfrecords_schema.InputError` and
    ``FileNotFoundError``.

    ``FileNotFoundError`` counts as input because in these commands every path comes from the
    user (a flag, a glob, a manifest row, a file beside a given one): a missing file is something
    the user must fix, whichever layer (ours, Python's ``open``, Beam's file systems) noticed it.
    """
    return isinstance(error, (InputError, FileNotFoundError))


def report_error(prog: str, message: str) -> None:
    """Prints ``<prog>: error: <message>`` on stderr (the one line a user sees)."""
    print(f"{prog}: error: {message}", file=sys.stderr)


def run_command(
    prog: str,
    body: Callable[[], int],
    describe: Optional[Callable[[BaseException], str]] = None,
) -> int:
    """Runs ``body`` (a command's work, returning its exit code) and turns exceptions into codes.

    - :func:`is_input_error` (``InputError`` and its subclasses ``SchemaError``, ``DataError``,
      ``PredictError``; ``FileNotFoundError``): one line ``<prog>: error: ...`` on stderr, exit
      code 2 (:data:`EXIT_BAD_INPUT`).
    - :class:`CommandFailure`: one such line, exit code ``error.exit_code``.
    - Any other ``Exception`` is a bug: logged with its full traceback (``logging.exception``),
      then ``<prog>: internal error: <Type>: <message> -- this is a bug, ...`` on stderr, exit
      code 1 (:data:`EXIT_INTERNAL_ERROR`).

    ``KeyboardInterrupt`` and ``SystemExit`` (``--help``) pass through unchanged.

    Args:
      prog: the command's name, e.g. ``landmarks-train``.
      body: the command's work; returns the exit code of a run that got to its end.
      describe: the one-line message of an input error or a ``CommandFailure`` (default
        :func:`first_line`).
    """
    describe = describe or first_line
    try:
        return body()
    except Exception as error:  # noqa: BLE001 - sorted by cause below, a bug is re-reported
        if is_input_error(error):
            report_error(prog, describe(error))
            return EXIT_BAD_INPUT
        if isinstance(error, CommandFailure):
            report_error(prog, describe(error))
            return error.exit_code
        logging.getLogger(prog).exception("%s: unexpected %s", prog, type(error).__name__)
        print(f"{prog}: internal error: {type(error).__name__}: {first_line(error)} -- {BUG_HINT}",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


# ---------------------------------------------------------------------------------------------
# Reachability of remote resources.

REACH_TIMEOUT_SECONDS = 10.0
"""How long a connection to a storage or web endpoint may take before the resource counts as
unreachable: far above a working connection's milliseconds, far below the two minutes the
storage clients spend retrying an endpoint that does not answer."""


def remote_endpoint(path: str) -> Optional[tuple[str, int]]:
    """``(host, port)`` that a read or write of ``path`` connects to first, or None for a local
    path.

    ``gs://``: the storage emulator of ``STORAGE_EMULATOR_HOST`` when set, else
    ``storage.googleapis.com:443``; ``http(s)://``: the URL's host. Either through the proxy of
    ``HTTPS_PROXY``/``HTTP_PROXY`` when one is set (then the proxy is what must answer).
    """
    import os
    import urllib.parse
    import urllib.request

    if path.startswith("gs://"):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        url = emulator if emulator else "https://storage.googleapis.com"
        if "://" not in url:
            url = "http://" + url
    elif path.startswith(("http://", "https://")):
        url = path
    else:
        return None
    parsed = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname or "", port


def unreachable_cause(host: str, port: int,
                      timeout: float = REACH_TIMEOUT_SECONDS) -> Optional[str]:
    """Why a TCP connection to ``host:port`` fails (e.g. ``ConnectionRefusedError: [Errno 111]
    Connection refused``), or None when it succeeds within ``timeout`` seconds."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:  # refused, reset, DNS failure (gaierror), timeout
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def check_reachable(paths: dict, timeout: float = REACH_TIMEOUT_SECONDS) -> None:
    """Checks that the endpoint of every remote path can be connected to, once per endpoint.

    Args:
      paths: flag (e.g. ``--model_dir``) -> path; empty and local paths are skipped.

    Raises:
      ResourceUnreachable: one line naming the flag, the path, the endpoint and the cause.
    """
    checked: dict = {}
    for flag, path in paths.items():
        endpoint = remote_endpoint(str(path)) if path else None
        if endpoint is None:
            continue
        if endpoint not in checked:
            checked[endpoint] = unreachable_cause(*endpoint, timeout=timeout)
        cause = checked[endpoint]
        if cause is not None:
            raise ResourceUnreachable(
                f"{flag} {path}: cannot reach {endpoint[0]}:{endpoint[1]} ({cause}); check "
                "the network, the proxy settings or STORAGE_EMULATOR_HOST")
