"""The `icl-probe` command line: parse options, call the library, print. Errors become one line.

`app.py` holds the app and the one boundary where errors become a line, `options.py` the options that
several commands share (each declared once); each command module registers its commands on `app`.
"""

from . import batch as _batch  # noqa: F401 - registers batch and merge
from . import commands, sweep  # noqa: F401 - registers the commands
from . import heads as _heads  # noqa: F401 - registers heads
from . import regression as _regression  # noqa: F401 - registers regression train and run
from . import study as _study  # noqa: F401 - registers study
from . import transfer as _transfer  # noqa: F401 - registers transfer
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
