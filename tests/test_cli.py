from __future__ import annotations

import subprocess
import sys

import pytest

from metaembed.cli import build_parser, main


def test_metaembed_errors_become_one_line_messages_and_exit_2(capsys, tmp_path):
    assert main(["demo", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaembed demo: error: ") and "make data" in err and "Traceback" not in err


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["frobnicate"])
    assert exit_info.value.code == 2


def test_console_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "metaembed.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout


def test_help_does_not_import_torch():
    # every room imports its heavy dependencies inside its commands: `metaembed --help` answers at once
    probe = (
        "import sys, metaembed.cli; metaembed.cli.build_parser(); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
