"""What a training command refuses to do, and why: printed as one line by the CLI (exit 2).

A refusal names the flag, file or run at fault; anything else raised in a stage is a defect and
keeps its traceback.
"""

from __future__ import annotations


class RefusedError(ValueError):
    """The command's flags or runs do not fit together (a resume with another recipe, a card that
    is not this model's evaluation...)."""


class InputMissingError(FileNotFoundError):
    """A file the command needs is not there (the dataset, a run's exported model...)."""
