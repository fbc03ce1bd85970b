"""Errors caused by the user's input (config, files, prompts): the CLI prints
these as one line and exits 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
  """Bad input: the message names the file, field or value at fault."""


class ConfigError(UserError, ValueError):
  """A config value is missing, unknown or inconsistent."""
