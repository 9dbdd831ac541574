"""User-facing errors.

Anything a user can cause (a wrong name, a broken file, a bad value) raises a subclass of
:class:`BenchError` whose message names the file, key or value. The CLI prints that message on one
line instead of a traceback.
"""


class BenchError(Exception):
    """A mistake the user can fix; the message says what and where.

    Example:
        >>> raise BenchError("dataset 'cat16' not found; did you mean 'cat15'?")
        Traceback (most recent call last):
        bench.errors.BenchError: dataset 'cat16' not found; did you mean 'cat15'?
    """


class RegistryError(BenchError):
    """Unknown or duplicate backbone name."""


class DatasetError(BenchError):
    """A dataset card or a dataset file is missing or malformed."""


class CheckpointError(BenchError):
    """A checkpoint cannot be read or does not fit the declared architecture."""


class DownloadError(BenchError):
    """A download failed or its content does not match the declared sha256."""


class ArchiveError(BenchError):
    """An archive is malformed or tries to write outside its target folder."""
