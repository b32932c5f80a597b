from __future__ import annotations

import importlib
import subprocess
import sys

from toolkit.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command(capsys):
    assert main(["finetuen"]) == 2
    assert "unknown command 'finetuen'" in capsys.readouterr().err


def test_every_command_module_exists_and_has_main():
    for name, (module, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "main", None)), name


def test_console_script_help_is_fast():
    # the table imports command modules lazily: `toolkit --help` must not import torch
    code = "import sys, toolkit.cli; toolkit.cli.main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
