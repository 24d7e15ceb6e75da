"""The one error type of the data layer, so callers can catch data problems apart from bugs."""

from mcti_jax.errors import MctiError


class DataError(MctiError):
  """A data source, image file, split file or cache file is missing, malformed or too small."""
