"""Where pip put the ``portshare`` executable that came in this wheel."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


def _user_scheme() -> str:
    if sys.version_info >= (3, 10):
        return sysconfig.get_preferred_scheme("user")
    if os.name == "nt":
        return "nt_user"
    if sys.platform == "darwin" and getattr(sys, "_framework", None):
        return "osx_framework_user"
    return "posix_user"


def find_executable() -> str:
    """The path of the ``portshare`` binary installed with this package.

    Looked for where pip puts a wheel's scripts: the scripts directory of this
    interpreter's install scheme (a venv's ``bin``/``Scripts``), of the user scheme
    (``pip install --user``), beside the package (``pip install --target DIR`` puts it in
    ``DIR/bin``), then on ``PATH``. Raises ``FileNotFoundError`` if it is nowhere.
    """
    exe = "portshare" + (sysconfig.get_config_var("EXE") or "")
    candidates = [
        Path(sysconfig.get_path("scripts")),
        Path(sysconfig.get_path("scripts", scheme=_user_scheme())),
        Path(__file__).resolve().parent.parent / "bin",
    ]
    for directory in candidates:
        path = directory / exe
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(exe)
    if found:
        return found
    searched = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(
        f"the portshare executable is not installed (looked in {searched} and on PATH); "
        "`pip install portshare` puts it there"
    )
