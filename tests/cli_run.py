"""The CLI called in-process, as the tests of its messages need it."""
from __future__ import annotations

from edgecl.cli import main as cli


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one `edgecl` call; a traceback on stderr fails the test wherever it comes."""
    capsys.readouterr()
    code = cli(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err
