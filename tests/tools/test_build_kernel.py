"""The kernel builder: committed kernels are current, self-contained, and train like dogkit."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dogkit.core import registry
from dogkit.core.data import save_cache

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import build_kernel  # noqa: E402

ALLOWED = set(sys.stdlib_module_names) | {"numpy", "PIL", "torch", "torchvision"}


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_committed_kernel_is_what_the_builder_writes(name):
    committed = ROOT / "kernels" / f"{name}.py"
    assert committed.exists(), f"run: python tools/build_kernel.py --model {name}"
    assert committed.read_text() == build_kernel.build(name), f"stale: python tools/build_kernel.py --model {name}"
    notebook = committed.with_suffix(".ipynb")
    assert notebook.read_text() == build_kernel.notebook_text(committed.read_text(), name), \
        f"stale: python tools/build_kernel.py --model {name}"


KERNEL_CAP = 3000  # the brief's: the most lines a kernel may carry
MACHINERY_RATCHET = 2393  # the header, the machinery and the entry point: every line of a kernel but its front


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_the_front_reads_settings_model_recipe_loop_and_the_machinery_follows(name):
    """Settings, the model, its blocks, augmentation, the recipe and the training loop come first
    (biggan's in at most ~700 lines), then the MACHINERY line; nothing the front shows is repeated
    behind it."""
    text = build_kernel.build(name)
    lines = text.splitlines()
    settings = lines.index("# Settings: the model's hyper-parameters (any setting of SETTINGS below can go here)")
    machinery = next(i for i, ln in enumerate(lines) if ln.startswith("# MACHINERY."))
    front, back = "\n".join(lines[settings:machinery]), "\n".join(lines[machinery:])
    entry = registry.get(name)
    for defined in (f"class {entry.cls.__name__}:", "def draw_batch(", "def train_step(", "def set_schedule(",
                    "def generate(", "def train_loop(tr):"):
        assert defined in front and defined not in back, defined
    order = [front.index(t) for t in ("# Model", "# Recipe", "# The training loop")]
    assert order == sorted(order)
    if name == "biggan":
        assert machinery - settings <= 700, machinery - settings
    assert len(lines) <= KERNEL_CAP, f"{name}: {len(lines)} lines, the cap is {KERNEL_CAP}"
    # and what is not the front never grows back: lower this bound as it shrinks, never raise it
    assert len(lines) <= MACHINERY_RATCHET + (machinery - settings), (len(lines), machinery - settings)


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_the_notebook_is_the_kernel_in_sections(name):
    """nbformat 4, valid; a markdown cell first, the settings cell, a heading and a code cell per
    section of the contents, the run cell last; the code cells joined are the .py, exactly."""
    nbformat = pytest.importorskip("nbformat")
    text = build_kernel.build(name)
    nb = nbformat.reads(build_kernel.notebook_text(text, name), as_version=4)
    nbformat.validate(nb)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[:2] == ["markdown", "code"] and kinds[2:] == ["markdown", "code"] * ((len(kinds) - 2) // 2)
    assert "".join(c.source for c in nb.cells if c.cell_type == "code") == text
    contents = text.split("Contents (line numbers):\n")[1].split('"""')[0]
    titles = [ln.split(None, 1)[1] for ln in contents.splitlines() if ln.strip()]
    headings = [c.source.splitlines()[0] for c in nb.cells[2:] if c.cell_type == "markdown"]
    sections = [t for t in titles[1:] if not t.startswith("MACHINERY")]
    assert [h for h in headings if h[:3] == "## " and h not in ("## Machinery", "## Run")] == [
        f"## {k}. {t}" for k, t in enumerate(sections, 1)]
    assert headings[-1] == "## Run" and headings.index("## Machinery") == sections.index("Data")
    assert [h for h in headings if not h.startswith(("## ", "#### "))] == []  # "####": a part of machinery
    # the front is open; every machinery cell is collapsed on Kaggle (still run), the run cell open
    machinery = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## Machinery"))
    assert [(i, c.metadata) for i, c in enumerate(nb.cells[:machinery] + nb.cells[-2:]) if c.metadata != {}] == []
    hidden = [c for c in nb.cells[machinery:-2] if c.cell_type == "code"]
    assert hidden and [c.source[:80] for c in hidden if c.metadata != {"_kg_hide-input": True}] == []
    long = [(c.source[:80], len(c.source.splitlines())) for c in hidden if len(c.source.splitlines()) >= 600]
    assert long == []  # cut at the parts' banners
    assert "_SETTINGS = dict(" in nb.cells[1].source and nb.cells[-1].source.startswith("if __name__ == ")
    intro = nb.cells[0].source
    missing = [w for w in ("Generative Dog Images", "GPU T4 x2", "8h45m", "/kaggle/working/images.zip",
                           "dogkit score") if w not in intro]
    assert missing == [], f"the notebook's first cell lacks {missing}: {intro[:300]}"


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_kernel_imports_only_the_allowed_set(name):
    tree = ast.parse(build_kernel.build(name))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module.split(".")[0])
    assert found, "no imports parsed"
    # IPython: imported only inside show_png, once notebook_shell() found the notebook's shell
    lazy = {n.module for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "show_png"
            for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
    assert lazy == {"IPython.display"} and "IPython" not in {n.names[0].name for n in tree.body
                                                               if isinstance(n, ast.Import)}
    found.discard("IPython")
    assert found <= ALLOWED, f"not allowed in a kernel: {sorted(found - ALLOWED)}"
    assert "dogkit" not in found


def test_budget_option_sets_the_kaggle_budget():
    assert ", kaggle_budget=\"5h45m\", kaggle_sessions=KAGGLE_SESSIONS)" in build_kernel.build("dcgan", "6h")
    with pytest.raises(SystemExit):
        build_kernel.build("dcgan", "10m")


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_kernel_and_package_train_identically(name, tmp_path, tiny_dataset):
    cache = tmp_path / "tiny.npz"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    common = ["--data", str(cache), "--budget", "1h", "--steps", "6", "--seed", "3", "--width", "4",
              "--batch-size", "8", "--n-samples", "64", "--log-every", "0", "--device", "cpu"]
    env = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=run_env,
                             cwd=tmp_path)  # the two at once, one thread each: independent processes
            for command, run_env in (
                ([sys.executable, str(ROOT / "kernels" / f"{name}.py"), *common, "--out", str(tmp_path / "k")], env),
                ([sys.executable, "-m", "dogkit.cli", "train", "--model", name, *common, "--out", str(tmp_path / "p")],
                 {**env, "PYTHONPATH": str(ROOT)}))]
    for what, run in zip(("kernel", "package"), runs):
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{what}: {err[-2000:]}"

    def losses(folder):
        return [{k: v for k, v in r.items() if k not in ("elapsed", "steps_per_s", "p", "lr_g")}
                for r in map(json.loads, open(folder / "log.jsonl"))]

    assert len(losses(tmp_path / "k")) == 6
    assert losses(tmp_path / "k") == losses(tmp_path / "p")


@pytest.mark.parametrize("name", ["dcgan", "biggan"])
def test_contents_points_at_every_section_in_order(name):
    lines = build_kernel.build(name).splitlines()
    start = lines.index("Contents (line numbers):")
    entries = []
    for line in lines[start + 1:]:
        if line == '"""':
            break
        number, title = line.split(maxsplit=1)
        entries.append((int(number), title))
    banners = [i + 1 for i in range(1, len(lines) - 1)
               if lines[i] == build_kernel.RULE and lines[i + 1] != build_kernel.RULE and lines[i + 2] == build_kernel.RULE]
    machinery = [(n, t) for n, t in entries if t.startswith("MACHINERY")]
    assert len(machinery) == 1 and lines[machinery[0][0]].startswith("# MACHINERY.")
    assert lines[machinery[0][0] - 1] == "# " + "=" * 93
    entries.remove(machinery[0])
    assert [n for n, _ in entries] == banners and len(banners) >= 8
    for number, title in entries:
        assert lines[number - 1] == build_kernel.RULE and lines[number].startswith(f"# {title}"), (number, title)
    titles = [t for _, t in entries]
    assert titles.index("The training loop") + 1 == titles.index("Data") and machinery[0][0] < entries[
        titles.index("Data")][0]
    assert titles[0] == "Settings" and titles[-1] == "Entry point"
    assert titles.index("Model") < titles.index("Data") < titles.index("Training")


@pytest.mark.slow
def test_a_push_ready_kaggle_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):  # no user name anywhere: one line that says how
        build_kernel.main(["--model", "dcgan", "--kaggle", str(tmp_path / "k")])
    assert "--user NAME" in capsys.readouterr().err
    assert build_kernel.main(["--model", "dcgan", "--kaggle", str(tmp_path / "k"), "--user", "ann",
                              "--title", "Dogs: DCGAN (v2)"]) == 0
    meta = json.loads((tmp_path / "k" / "kernel-metadata.json").read_text())
    assert meta == {"id": "ann/dogs-dcgan-v2", "title": "Dogs: DCGAN (v2)", "code_file": "dogs-dcgan-v2.py",
                    "language": "python", "kernel_type": "script", "is_private": True, "enable_gpu": True,
                    "enable_internet": False, "machine_shape": "NvidiaTeslaT4",
                    "competition_sources": ["generative-dog-images"], "dataset_sources": [], "kernel_sources": []}
    assert (tmp_path / "k" / "dogs-dcgan-v2.py").read_text() == build_kernel.build("dcgan")
    out = capsys.readouterr().out
    assert f"kaggle kernels push -p {tmp_path / 'k'} --accelerator NvidiaTeslaT4" in out
    assert "kaggle kernels status ann/dogs-dcgan-v2" in out and "kaggle kernels output ann/dogs-dcgan-v2" in out
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "kaggle.json").write_text(json.dumps({"username": "bob", "key": "x"}))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    assert build_kernel.main(["--model", "biggan", "--kaggle", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "kernel-metadata.json").read_text())["id"] == "bob/dogkit-biggan"
    assert build_kernel.main(["--model", "biggan", "--kaggle", str(tmp_path / "n"), "--notebook"]) == 0
    meta = json.loads((tmp_path / "n" / "kernel-metadata.json").read_text())
    assert (meta["kernel_type"], meta["code_file"]) == ("notebook", "dogkit-biggan.ipynb")
    assert (tmp_path / "n" / "dogkit-biggan.ipynb").read_text() == build_kernel.notebook_text(
        build_kernel.build("biggan"), "biggan")
    assert not (tmp_path / "n" / "dogkit-biggan.py").exists()


def test_a_kaggle_folder_for_a_run_over_several_sessions(tmp_path, capsys):
    """--sessions 3 writes KAGGLE_SESSIONS = 3 into the kernel's settings; the first push attaches
    only the competition, --continue also the notebook's own output (the later sessions)."""
    folder = tmp_path / "k"
    assert build_kernel.main(["--model", "dcgan", "--kaggle", str(folder), "--user", "ann", "--sessions", "3"]) == 0
    assert "\nKAGGLE_SESSIONS = 3\n" in (folder / "dogkit-dcgan.py").read_text()
    assert json.loads((folder / "kernel-metadata.json").read_text())["kernel_sources"] == []
    assert "For sessions 2 to 3, once the first has finished: the same command with --continue" in capsys.readouterr().out
    assert build_kernel.main(["--model", "dcgan", "--kaggle", str(folder), "--user", "ann", "--sessions", "3",
                              "--continue"]) == 0
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["kernel_sources"] == ["ann/dogkit-dcgan"] and meta["competition_sources"] == ["generative-dog-images"]
    assert "this notebook's output attached" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --continue means nothing for a one-session kernel
        build_kernel.main(["--model", "dcgan", "--kaggle", str(folder), "--user", "ann", "--continue"])
    assert "--continue goes with --kaggle DIR and --sessions 2 or more" in capsys.readouterr().err


def test_the_machinery_carries_no_docstring_but_a_class_made_of_one():
    """Past the MACHINERY line only a class whose docstring is its whole body (an exception) keeps
    its summary line from dogkit/core; every other docstring stays there; the front keeps its
    docstrings whole."""
    import importlib
    import inspect
    text = build_kernel.build("biggan")
    tree, machinery = ast.parse(text), text.splitlines().index(build_kernel.MACHINERY.splitlines()[1]) + 1
    core = [importlib.import_module(f"dogkit.core.{m}") for m in
            ("data", "distributed", "runtime", "sample", "settings", "train", "kernel")]
    kept, left_out, whole_in_front = 0, 0, 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        source = next((inspect.getdoc(getattr(m, node.name)) for m in core if hasattr(m, node.name)), None)
        if node.lineno < machinery:
            whole_in_front += doc is not None and "\n" in doc
        elif doc is None:
            left_out += source is not None
        else:
            assert len(node.body) == 1 and "\n" not in doc, f"{node.name}: a machinery docstring"
            assert source is None or " ".join(source.split()).startswith(doc), f"{node.name}: {doc!r}, {source!r}"
            kept += 1
    assert kept >= 5 and left_out > 100 and whole_in_front > 5, (kept, left_out, whole_in_front)


def test_a_summary_too_long_for_a_line_stops_the_build_naming_the_function():
    source = ('def short():\n    """One line.\n\n    More text."""\n\n\n'
              'def long():\n    """' + "A sentence far too long for one line " * 4 + 'ends here.\n    More."""\n')
    tree = ast.parse(source)
    text, new_tree, too_long = build_kernel.summarised(source, tree, [0, 1])
    assert ast.get_docstring(new_tree.body[0]) == "One line."  # a docstring that is the whole body stays
    more = 'class Alone(Exception):\n    """Its whole body."""\n\n\ndef other():\n    """Gone."""\n    return 1\n'
    _, cut, _ = build_kernel.summarised(more, ast.parse(more), [0, 1])
    assert ast.get_docstring(cut.body[0]) == "Its whole body." and ast.get_docstring(cut.body[1]) is None
    assert cut.body[1].body[0].value.value == 1
    assert len(too_long) == 1 and too_long[0].startswith("long (line 8: its first sentence makes a line of")
