"""The one base class of problems with a user's inputs: files, checkpoints, models, settings.

Commands print these as one line; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A problem with what the user gave (a file, a checkpoint, a model, a setting), said so they can fix it."""
