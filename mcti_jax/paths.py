"""Checks of the paths a user gives, made before any work: one line that names the field and the fix.

A caption file saved by Notepad (a UTF-8 byte-order mark) or in latin-1, a workdir that is a file, an output folder
on a read-only mount: each would otherwise surface as a traceback, or as a silently wrong result, after the models
loaded or the work was done.
"""

import os
from pathlib import Path

from mcti_jax.errors import ConfigError, MctiError

BOM = "\ufeff"


def _subject(path, what: str) -> str:
  """"tokens.caption_file=x" for a config field or flag, "labels file x" for words."""
  return f"{what}={path}" if " " not in what else f"{what} {path}"


def _with(message: str, fix: str) -> str:
  return f"{message}; {fix}" if fix else message


def input_file(path, what: str, fix: str = "", error: type[MctiError] = ConfigError) -> Path:
  """`path` as a Path, if it is a file: else says whether it is missing or a folder."""
  file = Path(path).expanduser()
  if not os.path.isfile(file):
    kind = ("is a folder, not a file" if os.path.isdir(file) else "is not a regular file" if os.path.exists(file)
            else "does not exist")
    raise error(_with(f"{_subject(path, what)} {kind}", fix))
  return file


def input_folder(path, what: str, fix: str = "", error: type[MctiError] = ConfigError) -> Path:
  """`path` as a Path, if it is a folder: else says whether it is missing or a file."""
  folder = Path(path).expanduser()
  if not os.path.isdir(folder):
    kind = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
    raise error(_with(f"{_subject(path, what)} {kind}", fix))
  return folder


def read_text(path, what: str, fix: str = "", error: type[MctiError] = ConfigError) -> str:
  """The text of a file a user gives: UTF-8, a leading byte-order mark dropped (Notepad writes one, and it would
  otherwise become part of the first line's words)."""
  file = input_file(path, what, fix, error)
  try:
    data = file.read_bytes()
  except OSError as e:
    raise error(f"{_subject(path, what)} cannot be read ({e.strerror}); check its permissions") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise error(f"{_subject(path, what)} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); save it as "
                "UTF-8") from None
  return text.removeprefix(BOM)


def output_folder(path, what: str, error: type[MctiError] = ConfigError) -> Path:
  """`path` as a Path, if it is a folder we can write into or create: checked before any work, so that nothing is
  lost to a file in the way or a read-only mount at the end. Creates nothing. `path` is taken as given (no ~), as
  the writers take it."""
  folder = Path(path)
  subject = _subject(path, what)
  probe = folder
  while not os.path.exists(probe) and probe.parent != probe:  # the nearest existing folder above (or at) `folder`
    if os.path.islink(probe):
      raise error(f"{subject}: {probe} is a link to nothing; remove it or give another folder")
    probe = probe.parent
  if not os.path.isdir(probe):
    where = subject if probe == folder else f"{probe}, on the way to {subject},"
    raise error(f"{where} is a file, not a folder; give a folder (it is created if missing)")
  if not os.access(probe, os.W_OK | os.X_OK):
    where = "" if probe == folder else f" ({probe} cannot be written)"
    raise error(f"{subject} is not writable{where} (read-only mount or permissions); give a folder you can write to")
  return folder
