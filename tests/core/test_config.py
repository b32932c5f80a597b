"""The one-config-source rule: dataclass defaults < YAML (--config) < command line."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from toolkit.config import arg, parse_config
from toolkit.errors import ToolkitError


@dataclass
class Cfg:
    model: str = arg(None, "-m", "--model", help="model file", required=True)
    ctx: int = arg(128, "-c", "--ctx", help="context")
    lr: float = arg(1e-3, help="learning rate")
    use_checkpointing: bool = arg(True, help="gradient checkpointing")
    target: list[str] = arg(["attn_q", "attn_v"], help="targets")
    lora: list[str] = arg([], help="adapter", action="append")


def test_defaults_and_cli():
    c = parse_config(Cfg, ["-m", "x.gguf"], prog="t")
    assert (c.model, c.ctx, c.lr, c.use_checkpointing, c.target, c.lora) == (
        "x.gguf", 128, 1e-3, True, ["attn_q", "attn_v"], [])
    c = parse_config(Cfg, ["-m", "x", "-c", "64", "--no-use-checkpointing", "--target", "ffn_up",
                           "--lora", "a", "--lora", "b", "--lr", "2e-4"], prog="t")
    assert (c.ctx, c.use_checkpointing, c.target, c.lora, c.lr) == (64, False, ["ffn_up"], ["a", "b"], 2e-4)


def test_yaml_then_cli_wins(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: from_yaml.gguf\nctx: 256\nuse-checkpointing: false\nlr: 0.01\n")
    c = parse_config(Cfg, ["--config", str(y), "-c", "32"], prog="t")
    assert (c.model, c.ctx, c.use_checkpointing, c.lr) == ("from_yaml.gguf", 32, False, 0.01)


def test_yaml_errors_name_the_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("modle: x\n")
    with pytest.raises(ToolkitError, match=r"c\.yaml: unknown option 'modle'"):
        parse_config(Cfg, ["--config", str(y)], prog="t")
    y.write_text("a: [unclosed\n")
    with pytest.raises(ToolkitError, match="not valid YAML"):
        parse_config(Cfg, ["--config", str(y)], prog="t")
    with pytest.raises(ToolkitError, match="config file not found"):
        parse_config(Cfg, ["--config", str(tmp_path / "none.yaml")], prog="t")


def test_required_missing_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, [], prog="t")
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_lora_flags_all_of_llama_cpps_forms():
    from toolkit.config import parse_lora_flags

    assert parse_lora_flags(["a.gguf,b.gguf"], [["c.gguf", "0.5"], ["d.gguf:2,e:f.gguf:-1"]]) == [
        ("a.gguf", 1.0), ("b.gguf", 1.0), ("c.gguf", 0.5), ("d.gguf", 2.0), ("e:f.gguf", -1.0)]
    for bad, message in [([["x.gguf", "half"]], "is not a number"), ([["x.gguf", "nan"]], "is not finite"),
                         ([["x.gguf"]], "expected FNAME:SCALE"), ([["a", "1", "b"]], "expected FNAME SCALE")]:
        with pytest.raises(ToolkitError, match=message):
            parse_lora_flags([], bad)
