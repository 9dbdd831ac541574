"""User-facing errors.

Anything a user can cause (a wrong name, a broken file, a bad value) raises a subclass of
:class:`BenchError` whose message names the file, key or value. The CLI prints that message on one
line instead of a traceback.
"""


class BenchError(Exception):
    """A mistake the user can fix; the message says what and where.

    ``exit_code`` is what the CLI exits with: 2 for a usage error (a wrong name, option or value),
    1 for a failure at run time (a download, a checkpoint, a data file).

    Example:
        >>> raise BenchError("dataset 'cat16' not found; did you mean 'cat15'?")
        Traceback (most recent call last):
        bench.errors.BenchError: dataset 'cat16' not found; did you mean 'cat15'?
    """

    exit_code = 2


class RegistryError(BenchError):
    """Unknown or duplicate backbone name."""


class DatasetError(BenchError):
    """A dataset card or a dataset file is missing or malformed."""

    exit_code = 1


class CheckpointError(BenchError):
    """A checkpoint cannot be read or does not fit the declared architecture."""

    exit_code = 1


class DownloadError(BenchError):
    """A download failed or its content does not match the declared sha256."""

    exit_code = 1


class ArchiveError(BenchError):
    """An archive is malformed or tries to write outside its target folder."""

    exit_code = 1


class UnknownDatasetError(DatasetError):
    """A dataset name that is neither a card nor a folder: a usage error."""

    exit_code = 2


class ResultConflictError(BenchError):
    """A result file exists for another configuration under the same label."""
