"""Errors that mean "the user gave something wrong": the command line prints them and exits 2."""
from __future__ import annotations


class UsageError(Exception):
    """Invalid user input (arguments, manifest, scan file): printed in one line, exit code 2."""


class Interrupted(Exception):
    """A run stopped by a signal after recording its interrupted jobs: the CLI exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = int(signum)
