"""The package's front door: help, verbs, error handling, config validation basics."""

from __future__ import annotations

import subprocess
import sys


from cogumi.cli import build_parser, main

VERBS = ["train", "merge", "verify", "score", "eval", "compare", "gate", "failures", "pipeline", "report",
         "estimate", "demo"]


def test_help_lists_every_verb():
    text = build_parser().format_help()
    for verb in VERBS:
        assert verb in text


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "cogumi", "--help"], capture_output=True, text=True, check=True)
    assert "pipeline" in out.stdout


def test_user_error_is_one_line_and_nonzero(tmp_path, capsys):
    bad = tmp_path / "missing.yaml"
    code = main(["estimate", str(bad)])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and "missing.yaml" in err
    assert "Traceback" not in err
