"""The config loader's contract (types, unknown keys, validation) and the CLI's one-line errors and help."""
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from argen.cli import COMMANDS, main
from argen.config import ConfigError, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Model:
    name: str = "GPT-B"
    heads: int = 12
    precision: Literal["fp32", "bf16"] = "bf16"
    dropout: float | None = None


@dataclass
class Root:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    tp: int = 1
    tags: list[str] = field(default_factory=list)

    def validate(self):
        if self.model.heads % self.tp:
            raise ValueError(f"model.heads {self.model.heads} is not divisible by tp {self.tp}")


def test_yaml_plus_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  name: GPT-L\n  heads: 16\noptim:\n  lr: 2e-4\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\ntp: 2\n")
    cfg = load_config(Root, tmp_path / "r.yaml", ["optim.betas=[0.8, 0.9]", "model.precision=fp32", "tags=a,b",
                                                  "model.dropout=0.1"])
    assert cfg.model.name == "GPT-L" and cfg.model.heads == 16 and cfg.tp == 2
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.precision == "fp32" and cfg.tags == ["a", "b"] and cfg.model.dropout == 0.1
    save_config(cfg, tmp_path / "saved.yaml")
    assert to_dict(load_config(Root, tmp_path / "saved.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("override,message", [
    (["model.nmae=x"], "unknown config key 'model.nmae' (did you mean 'name'?)"),
    (["model.heads=twelve"], "model.heads: expected an integer"),
    (["model.precision=fp16"], "model.precision: 'fp16' is not one of"),
    (["optim.lr=-1"], "optim: lr must be positive"),
    (["tp=5"], "model.heads 12 is not divisible by tp 5"),
    (["tp"], "must look like key.sub=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Root, None, override)
    assert message in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, tmp_path / "nope.yaml")


def test_cli_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("tokenize", "train", "sample", "eval", "submit", "convert", "models", "serve", "plan"):
        assert name in out and name in COMMANDS


def test_cli_unknown_command_suggests(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "argen.cli", "sample", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing config.json" in r.stderr
    r = subprocess.run([sys.executable, "-m", "argen.cli", "convert", "llamagen-gpt", str(tmp_path / "x.pt"),
                        str(tmp_path / "o"), "--model", "GPT-Q"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["models", "sample", "convert"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"argen {cmd}" in capsys.readouterr().out


def test_models_lists_exact_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "110,888,448" in out and "3,096,659,200" in out and "777,678,080" in out
