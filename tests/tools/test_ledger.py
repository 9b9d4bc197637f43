"""The results ledger: rows are checked, and the generated tables are what the ledger says."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import ledger  # noqa: E402


def test_the_tables_are_generated_from_the_committed_ledger():
    rows = ledger.load()
    assert rows, "results/ledger.jsonl is empty"
    for page, text in ledger.render_pages(rows).items():  # every table in exactly one page
        assert text == Path(page).read_text(), f"{page} is stale: python tools/ledger.py render"
    best = ledger.table_best(rows)
    mifids = [float(line.split("**")[1]) for line in best[2:]]
    assert mifids == sorted(mifids) and len(mifids) <= 5  # best first


def test_the_readmes_proxy_view_stays_bounded_and_says_how_many_more():
    """However many proxy rows the ledger gains, the README shows the best PROXY_SHORT_ROWS and one
    line naming how many more docs/results.md holds (the README stays a front page)."""
    rows = [r for r in ledger.load() if r.get("kind") == "proxy"]
    arms = list(ledger.judged_arms(rows))
    assert len(arms) > ledger.PROXY_SHORT_ROWS  # the committed ledger already holds more
    short = ledger.table_proxy_short(rows)
    assert len(short) == 2 + ledger.PROXY_SHORT_ROWS + 1
    assert short[-1].startswith(f"| ... | {len(arms) - ledger.PROXY_SHORT_ROWS} more |")
    few = [r for r in rows if r["entry"] == "proxy-biggan-flip"]
    assert not any("more |" in line for line in ledger.table_proxy_short(few))


def test_a_bad_row_lists_every_problem():
    with pytest.raises(ledger.LedgerError, match=r"unknown key 'mifd'.*fid is required.*mifid is required"):
        ledger.check_row({"kind": "run", "model": "dcgan", "budget": "8m", "distance": 0.2, "device": "x",
                          "command": "c", "mifd": 1.0})
    with pytest.raises(ledger.LedgerError, match="kind 'score': choose from run, sweep, throughput"):
        ledger.check_row({"kind": "score"})
    with pytest.raises(ledger.LedgerError, match=r"seconds '554': must be a number; steps 1.5: must be a number"):
        ledger.check_row({"kind": "timing", "settings": "s", "seconds": "554", "steps": 1.5, "device": "x",
                          "command": "c"})


def test_add_stores_numbers_as_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "LEDGER", tmp_path / "ledger.jsonl")
    monkeypatch.setattr(ledger.append, "__defaults__", (tmp_path / "ledger.jsonl",))
    assert ledger.main(["add", "--kind", "timing", "--settings", "s", "--seconds", "554", "--device", "x",
                        "--command", "c"]) in (0, None)
    assert ledger.load(tmp_path / "ledger.jsonl")[0]["seconds"] == 554.0


def test_rows_append_and_render_into_their_blocks(tmp_path):
    path = tmp_path / "ledger.jsonl"
    row = ledger.append({"kind": "run", "model": "biggan", "settings": "flip+diffaug", "budget": "8m", "steps": 10,
                         "fid": 70.123, "distance": 0.2, "mifid": 70.123, "device": "H100", "torch": "2.11",
                         "command": "python kernels/biggan.py"}, path)
    assert set(row) == set(ledger.KEYS) and row["commit"] and row["date"]
    text = "a\n<!-- ledger:runs -->\nold\n<!-- /ledger:runs -->\nb\n"
    text += "<!-- ledger:sweep -->\n<!-- /ledger:sweep -->\n<!-- ledger:throughput -->\n<!-- /ledger:throughput -->\n"
    text += "<!-- ledger:timing -->\n<!-- /ledger:timing -->\n<!-- ledger:cleaning -->\n<!-- /ledger:cleaning -->\n"
    out = ledger.render(text, ledger.load(path))
    assert "old" not in out and "| biggan | flip+diffaug | 8m | 10 |" in out and "| 70.12 | 0.200 | 70.12 |" in out
    (tmp_path / "a.md").write_text(text)
    (tmp_path / "b.md").write_text("<!-- ledger:runs -->\n<!-- /ledger:runs -->\n")
    with pytest.raises(ledger.LedgerError, match=r"ledger:best --> is in 0 pages.*ledger:runs --> is in 2 pages"):
        ledger.render_pages([], [tmp_path / "a.md", tmp_path / "b.md"])


def test_a_fid_only_row_needs_no_distance_but_says_so():
    row = {"kind": "run", "model": "biggan", "budget": "8m", "fid": 80.0, "device": "NVIDIA H200",
           "command": "python tools/gpu_bench.py run", "scoring": "fid only: int8 Inception on NVIDIA H200"}
    assert ledger.check_row(row)["distance"] is None
    with pytest.raises(ledger.LedgerError, match="distance is required"):
        ledger.check_row(dict(row, scoring="exact"))
