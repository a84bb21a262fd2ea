"""Flower's commands are found beside the interpreter that runs fedlora, whatever the calling shell's PATH."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from deploy.launcher import env


def test_flowers_commands_are_found_beside_the_interpreter_without_them_on_path(tmp_path: Path) -> None:
    beside = Path(sys.executable).parent
    environ = env(tmp_path / "home", base={"PATH": "/nonexistent"})
    for command in ("flower-superlink", "flower-supernode", "flwr"):
        assert shutil.which(command, path="/nonexistent") is None
        assert Path(str(shutil.which(command, path=environ["PATH"]))) == beside / command
    assert environ["PATH"].split(os.pathsep)[1:] == ["/nonexistent"]  # the caller's PATH kept, after the scripts folder
