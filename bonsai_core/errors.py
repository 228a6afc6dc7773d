"""The one exception family for everything a user can get wrong.

Every message says what was wrong, with the value, and what to do instead. Nodes and the CLI
catch ``BonsaiError`` and show its text; anything else is a bug in this project.
"""


class BonsaiError(Exception):
    """Base class: a problem the user can fix (bad file, bad request, missing device...)."""


class BonsaiCheckpointError(BonsaiError):
    """A model file or folder is missing, truncated, mislabelled, of the wrong shape or too new."""


class BonsaiRequestError(BonsaiError):
    """A generation request is out of range: resolution, prompt length, steps, guidance..."""


class BonsaiDeviceError(BonsaiError):
    """The asked-for device or dtype is not available here."""


class BonsaiMemoryError(BonsaiError):
    """The device ran out of memory, or a request would need more than the device has."""


class BonsaiCancelledError(BonsaiError):
    """The user cancelled a running generation (CLI Ctrl-C or a cancel check that returned True)."""
