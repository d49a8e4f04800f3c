"""The one check every bad-input CLI test makes: `python -m multibyte ...` run in process ends in
exit status 2 with a single line `multibyte: <message>` on stderr and no traceback."""

import pytest

from multibyte.cli import main


def one_line_error(capsys, *args: str) -> str:
    """Run the CLI on `args`; assert the one-line error and return its message."""
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"multibyte: {stopped.value}"
    return str(stopped.value)
