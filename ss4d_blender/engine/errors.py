"""Errors the engine raises on purpose. Each message is written for the person using the tool:
it says what went wrong and what to do about it. The Blender layer shows `str(err)` as is."""


class SS4DError(Exception):
    """Base of every error meant to be shown to the user."""


class InputError(SS4DError):
    """The input frames cannot be used (unreadable video, no foreground, too few frames, ...)."""


class WeightsError(SS4DError):
    """Model weights are missing, incomplete or do not match the model (names the file and key)."""


class DeviceOutOfMemory(SS4DError):
    """The accelerator ran out of memory; the message says what to lower."""


class Cancelled(SS4DError):
    """The user cancelled the run. Nothing was produced."""

    def __init__(self, message: str = "Cancelled."):
        super().__init__(message)
