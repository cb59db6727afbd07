"""The one error the data tools raise on purpose.

`DataError` is a `ConfigError`: a data file, a source folder or a prepare-data option is wrong, and
the person running the command can fix it. `prepare-data` turns it into exit code 2.
"""

from __future__ import annotations

from fedgrid.errors import ConfigError


class DataError(ConfigError):
    """A data file or folder is missing, malformed or not what was asked for; the message names it."""
