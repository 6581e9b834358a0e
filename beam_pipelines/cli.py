"""What every command-line entry point of ``beam_pipelines`` shares."""

import argparse


class ErrorRaisingArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``ValueError`` instead of printing usage and exiting.

    Each ``main`` turns it into one line ``landmarks-<name>: error: ...`` and exit code 2, and
    ``run(argv)`` callers (tests, the demo) get an exception rather than ``SystemExit``.
    (``trainer.config`` has its own copy: ``trainer`` must not import ``beam_pipelines``.)
    """

    def error(self, message):
        raise ValueError(message)
