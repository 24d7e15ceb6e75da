"""The project's own errors: a problem with what the user gave (data, checkpoint, config), not a bug.

The CLI prints one of these as a single message and exits 1 (MCTI_DEBUG=1 shows
the traceback); anything else is a bug and keeps its traceback. Each also is a
ValueError, so callers that caught ValueError before still do.
"""


class MctiError(ValueError):
  """Bad input, named with what to do about it."""


class ConfigError(MctiError):
  """A config field is missing, of the wrong kind, out of range, or does not fit the workdir's run."""


class DataError(MctiError):
  """A data source, image file, split file or cache file is missing, malformed or too small."""
