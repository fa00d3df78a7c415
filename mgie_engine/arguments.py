"""An argparse parser whose errors are one line, for every console script of the project.

argparse's default prints the whole usage block before the error; a newcomer reads the first line and
misses the point. Here the error comes alone, with a pointer to ``--help``.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser that reports an argument error as ``prog: message (see prog --help)``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
