"""Errors an operator can cause: each carries one sentence that names the cause."""


class FieldgateError(Exception):
    """A failure the CLI reports as one line ``fieldgate: error: <message>``."""

    exit_code = 1


class ConfigError(FieldgateError):
    """The configuration file (or a secret file it names) is missing or wrong."""

    exit_code = 2
