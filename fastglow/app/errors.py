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
    """The first line of ``err``'s message (or its type's name when it has none); a first line that only
    announces the next ("Error(s) in loading state_dict for Glow:") is joined with it."""
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not text:
        return type(err).__name__
    return f"{text[0]} {text[1]}" if text[0].endswith(":") and len(text) > 1 else text[0]
