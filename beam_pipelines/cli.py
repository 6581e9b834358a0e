"""What every command-line entry point of ``beam_pipelines`` shares.

The parser and the exit-code wrapper are :mod:`trainer.cli`'s (one implementation for all
commands; ``trainer`` cannot import this package). This module adds what only the Beam jobs
need: telling Beam's flags apart from misspelt ones (:func:`parse_job_args`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tfrecords_schema import InputError
from trainer.cli import (  # noqa: F401 - re-exported for the commands of this package
    BUG_HINT_NO_TRACEBACK,
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    ErrorRaisingArgumentParser,
    ResourceUnreachable,
    check_reachable,
    option_strings,
    parse_bool,
    run_command,
    unknown_arguments_message,
)


def registered_option_classes() -> list[type]:
    """Every ``PipelineOptions`` subclass defined in this process that adds flags.

    Beam's own, Dataflow's (``GoogleCloudOptions``, ``WorkerOptions``, ...) and any a user
    defined, subclasses of subclasses included. As in Beam's ``get_all_options``, a class is
    taken once per name (a module imported twice defines it twice).
    """
    import apache_beam  # noqa: F401 - registers the option classes of Beam's own modules
    from apache_beam.options.pipeline_options import PipelineOptions

    found: dict[str, type] = {}
    pending = list(PipelineOptions.__subclasses__())
    while pending:
        options_class = pending.pop(0)
        pending.extend(options_class.__subclasses__())
        if "_add_argparse_args" in options_class.__dict__:
            found.setdefault(str(options_class), options_class)
    return list(found.values())


def beam_flag_parser() -> argparse.ArgumentParser:
    """A parser that knows every flag of :func:`registered_option_classes`, built by each
    class's own ``_add_argparse_args`` (so it follows Beam, no list is kept here).

    Built on each call: an options class defined after the first call still counts. A flag that
    two classes define is kept once (``conflict_handler="resolve"``). A bad value of a Beam flag
    (``--direct_num_workers two``) raises :class:`~tfrecords_schema.InputError`.
    """
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    class BeamFlagParser(_BeamArgumentParser):
        def error(self, message):
            raise InputError(message)

    parser = BeamFlagParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    for options_class in registered_option_classes():
        options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def runner_flag(beam_args: Sequence[str]) -> Optional[str]:
    """The value of ``--runner`` in ``beam_args`` (the last one given), or None."""
    runner = None
    for position, argument in enumerate(beam_args):
        if argument.startswith("--runner="):
            runner = argument.split("=", 1)[1]
        elif (argument == "--runner" and position + 1 < len(beam_args)
              and not beam_args[position + 1].startswith("-")):
            runner = beam_args[position + 1]  # a missing value is the parser's to report
    return runner


def import_runner_module(beam_args: Sequence[str]) -> Optional[type]:
    """Imports the module of the runner that ``--runner`` names; returns its class (or None
    without ``--runner``).

    A runner's own options (``DaskOptions``' ``--dask_client_address``, ...) are registered
    only once its module is imported, so the flag check must do this first. The name is
    resolved as Beam resolves it (``runners.runner.create_runner``): a name Beam knows, with or
    without the ``Runner`` suffix and in any case, or a dotted ``module.Class`` path.

    Raises:
      InputError: a name that is neither (the message is Beam's, with its list of runners), a
        module that does not import (e.g. the runner's package is not installed), or a module
        without that class.
    """
    import importlib

    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners import runner as runner_lib

    name = runner_flag(beam_args)
    if not name:
        return None
    known = runner_lib._RUNNER_MAP  # pylint: disable=protected-access - Beam's own name table
    qualified = known.get(name.lower(), known.get(name.lower() + "runner", name))
    if "." not in qualified:
        raise InputError(
            f"--runner {name}: unexpected pipeline runner; valid values are "
            f"{', '.join(StandardOptions.KNOWN_RUNNER_NAMES)} or the fully qualified name of a "
            "PipelineRunner subclass (module.Class)")
    module_name, class_name = qualified.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"--runner {name}: its module {module_name} does not import "
                         f"({type(error).__name__}: {error}); install the runner's package, "
                         "e.g. apache-beam[dask] for the DaskRunner") from error
    runner_class = getattr(module, class_name, None)
    if not isinstance(runner_class, type):
        raise InputError(f"--runner {name}: {module_name} has no runner class {class_name}")
    return runner_class


def check_beam_args(beam_args: Sequence[str], own_flags: Sequence[str] = ()) -> argparse.Namespace:
    """Checks that ``beam_args`` are all Beam flags with valid values; returns Beam's view of them.

    Args:
      beam_args: what the job's own parser left over.
      own_flags: the job's flags, for the suggestion when a flag is misspelt.

    Raises:
      InputError: an unknown flag (``unknown flag --runer (did you mean --runner?)``, suggestion
        from the job's and Beam's flags), a stray value, or a bad value of a Beam flag.
    """
    import_runner_module(beam_args)
    parser = beam_flag_parser()
    namespace, unknown = parser.parse_known_args(list(beam_args))
    if unknown:
        known = [*own_flags, *option_strings(parser)]
        raise InputError(unknown_arguments_message(unknown, known))
    return namespace


def parse_job_args(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
) -> tuple[argparse.Namespace, list[str]]:
    """Splits a Beam job's command line: (its own flags, Beam's flags unchanged, in order).

    Every argument must be either one of ``parser``'s flags or a flag of a registered
    ``PipelineOptions`` class (:func:`check_beam_args`); the Beam part is returned exactly as
    given, for ``PipelineOptions(beam_args)``.

    Raises:
      InputError: a bad own flag or value, an unknown flag, a bad Beam value.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(not action.option_strings for action in parser._actions):
        # A positional list (landmarks-query's PHOTOs) would also take the values of Beam's
        # flags (``--runner FnApiRunner``): Beam's flags and their values are taken out first.
        own_args, beam_args = _split_beam_args(argv)
        namespace, extras = parser.parse_known_intermixed_args(own_args)
        check_beam_args(extras + beam_args, own_flags=option_strings(parser))
        return namespace, beam_args
    namespace, beam_args = parser.parse_known_args(argv)
    check_beam_args(beam_args, own_flags=option_strings(parser))
    return namespace, list(beam_args)


def _split_beam_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (everything else, Beam's flags with their values), each in order."""
    import_runner_module(argv)
    _, rest = beam_flag_parser().parse_known_args(list(argv))
    own, beam, position = [], [], 0
    for argument in argv:
        if position < len(rest) and rest[position] == argument:
            own.append(argument)
            position += 1
        else:
            beam.append(argument)
    return own, beam
