"""The application's errors, and the one-line form of a library's exception that their messages quote.

The ``fastglow`` command prints an InputError (CheckpointError included) on one line and exits with 2,
a TrainingError with 1.
"""


class InputError(Exception):
    """Bad user input (a file, a flag, a data set): the message names it; the CLI prints it on one line."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit: the message names the file and the problem.
    Resuming skips such a file and tries the next older one."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


def one_line(err: BaseException) -> str:
    """The first line of ``err``'s message (or its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
