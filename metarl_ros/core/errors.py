"""Errors that mean "the user gave us something bad": the CLI prints them without a traceback."""


class MetarlError(Exception):
    """Base of all errors that name a bad input (file, field, value) and how to fix it."""
