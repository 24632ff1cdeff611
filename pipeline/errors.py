"""Errors that mean "the user gave something wrong": the command line prints them and exits 2."""
from __future__ import annotations


class UsageError(Exception):
    """Invalid user input (arguments, manifest, scan file): printed in one line, exit code 2."""
