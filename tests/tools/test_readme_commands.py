"""Every command in the README's bash blocks parses with the options the code has today, so an
example cannot drift from the code unnoticed: dogkit's click commands (file existence not
checked: the files are the reader's), the kernels' argparse, and each tool's argparse."""
import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
OURS = re.compile(r"(dogkit |python (kernels|tools)/\S+\.py|torchrun .*-m dogkit )")


def readme_commands():
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("  #")[0].split("&&"):
                part = part.strip()
                if OURS.match(part):
                    out.append(part)
    return out


class Parsed(Exception):
    pass


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 25


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command, monkeypatch):
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = ["dogkit"] + words[words.index("dogkit") + 1:]
    if words[0] == "dogkit":
        from dogkit.cli import main

        monkeypatch.setattr(click.Path, "convert", lambda self, value, param, ctx: value)
        ctx = main.make_context("dogkit", words[1:2])
        sub = main.get_command(ctx, words[1])
        assert sub is not None, f"no dogkit command {words[1]!r}"
        sub.make_context(words[1], words[2:])  # raises on an unknown option or a bad value
        return
    path = words[1]
    if path.startswith("kernels/"):
        from dogkit.core import kernel

        assert (ROOT / path).exists(), path
        kernel.parse_args(words[2:])
        return
    tool = importlib.import_module(Path(path).stem)
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        tool.main(words[2:])
