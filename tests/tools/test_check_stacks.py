"""tools/check_stacks.py on the interpreter at hand (no new environment): a kernel that trains is
counted, one that fails is named and makes the exit code 1."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_stacks  # noqa: E402


def rows(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_a_kernel_run_on_this_interpreter_counts(capsys):
    assert check_stacks.main(["--python", sys.executable, "--no-tests", "--kernels", "dcgan"]) == 0
    out = capsys.readouterr().out
    (row,) = rows(out)
    assert row["kernels"] == "1 of 1 wrote images.zip" and row["failed"] == {} and row["ok"]
    assert f"torch {__import__('torch').__version__}" in row["versions"]
    assert "| given | python " in out and "| none | not run | 1 of 1 wrote images.zip |" in out


@pytest.mark.slow
def test_a_failing_kernel_is_named_and_fails_the_check(capsys, monkeypatch):
    monkeypatch.setattr(check_stacks, "KERNEL_ARGS", check_stacks.KERNEL_ARGS + ["--widht", "8"])  # a typo
    assert check_stacks.main(["--python", sys.executable, "--no-tests", "--kernels", "gan"]) == 1
    (row,) = rows(capsys.readouterr().out)
    assert row["kernels"] == "0 of 1 wrote images.zip" and "exit 2" in row["failed"]["gan"]
    assert check_stacks.main(["--python", sys.executable, "--kernels", "nosuch"]) == 2


@pytest.mark.slow
def test_a_stack_that_cannot_be_made_is_a_failed_row_not_a_traceback(capsys, monkeypatch, tmp_path):
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    monkeypatch.setattr(check_stacks, "STACKS", {
        "no-python": {"python": "2.1", "tests": [], "packages": []},
        "bad-pin": {"python": here, "tests": [], "packages": ["torch=2.4"]},  # pip refuses the line itself
    })
    assert check_stacks.main(["--venvs", str(tmp_path), "--kernels", "gan"]) == 1
    by_name = {r["stack"]: r for r in rows(capsys.readouterr().out)}
    assert by_name["no-python"]["versions"] == "no Python 2.1 on this machine"
    assert "pip install" in by_name["bad-pin"]["versions"] and "failed" in by_name["bad-pin"]["versions"]
    assert not any(r["ok"] for r in by_name.values())
