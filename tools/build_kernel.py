#!/usr/bin/env python
"""Write ONE self-contained Kaggle kernel for a registered model, generated from dogkit's core.

    python tools/build_kernel.py --model dcgan                 # -> kernels/dcgan.py
    python tools/build_kernel.py --model dcgan -o /tmp/k.py
    python tools/build_kernel.py --model biggan --kaggle push/biggan --user NAME   # a folder `kaggle kernels push` takes
    python tools/build_kernel.py --model biggan --kaggle push/biggan --user NAME --sessions 3   # one run, 3 sessions
    python tools/build_kernel.py --model biggan --kaggle push/biggan --user NAME --sessions 3 --continue  # 2nd, 3rd

The kernel inlines the model's core modules in dependency order (data cleaning, augmentation,
sampling, model, training loop, entry point), drops the package-internal imports, gathers the
real imports on top and lifts the model's settings into a settings block under the header.
It imports only the standard library, numpy, PIL, torch and torchvision.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dogkit import __version__  # noqa: E402
from dogkit.core import registry  # noqa: E402
from dogkit.core.kernel import KAGGLE_MARGIN  # noqa: E402

ALLOWED_THIRD_PARTY = {"numpy", "PIL", "torch", "torchvision"}
ENTRY_MODULE = "dogkit.core.kernel"
# The kernel's front, after its settings, in reading order: what a reader changes. A module alone
# ("model": the model's own) comes whole with its banner; (title, [(module, names)]) picks those
# statements out of their modules. The rest follows the MACHINERY line, in dependency order.
FRONT = (
    ("model", None),
    ("dogkit.core.models.common", None),
    ("dogkit.core.augment", None),
    ("Recipe: the schedule, the EMA, the settings that follow the plan, one training step, sampling",
     [("dogkit.core.train", ("lr_multiplier", "ema_weight", "half_life_weight", "Ema", "TRUNCATION_BY_PASSES",
                             "truncation_for_passes", "from_plan", "set_schedule", "draw_batch", "train_step")),
      ("dogkit.core.sample", ("truncated_normal", "generate"))]),
    ("The training loop: one function, top to bottom (nanoGPT's train.py is the model)",
     [("dogkit.core.train", ("train_loop",))]),
)
MACHINERY = ("# " + "=" * 93 + "\n"
             "# MACHINERY. Everything below keeps a 9-hour run alive: data cleaning, the machine checks, several\n"
             "# GPUs, sampling and the zip, checkpoints, the time plan, the end and the entry point. Nothing below\n"
             "# needs reading to change the settings, the model or the recipe; its docstrings are in dogkit/core.\n"
             "# " + "=" * 93)
LINE_LENGTH = 120  # the project's (pyproject.toml); a summary docstring that would pass it stops the build
SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z]|$)")


def dogkit_imports(tree: ast.Module) -> list[str]:
    """The dogkit modules a module imports at top level."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dogkit."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("dogkit.")]
    return out


def module_order(roots: list[str]) -> list[str]:
    """Every dogkit module the roots import, followed transitively, dependencies first: no
    hand-kept module list, so a new import in dogkit/core reaches the kernels by itself."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in dogkit_imports(ast.parse(inspect.getsource(importlib.import_module(name)))):
            visit(dep)
        order.append(name)

    for root in roots:
        visit(root)
    return order


def defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def reachable(trees: dict[str, ast.Module], roots: set[str]) -> set[int]:
    """ids of the top-level statements the roots need, following names through every module
    (a function a kernel can never call is not carried). Statements that define nothing and
    are not imports (module-level code) are always kept."""
    by_name: dict[str, list[ast.stmt]] = {}
    keep: set[int] = set()
    todo = list(roots)
    for tree in trees.values():
        for node in tree.body:
            names = defined_names(node)
            for n in names:
                by_name.setdefault(n, []).append(node)
            if not names and not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)):
                keep.add(id(node))
                todo += used_names(node)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in by_name.get(name, ()):
            if id(node) not in keep:
                keep.add(id(node))
                todo += used_names(node)
    return keep


def first_line(tree: ast.Module) -> int:
    """The line (0-based) of the module's first statement: what is above it is its banner."""
    return min((getattr(n, "decorator_list", None) or [n])[0].lineno for n in tree.body) - 1 if tree.body else 0


def statement_source(lines: list[str], node: ast.stmt, first: int, banners: bool = True) -> str:
    """One top-level statement with the comment lines right above it (and, with banners, the
    `# ---- part` banner right above those)."""
    start = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) - 1
    while start > first and lines[start - 1].startswith("#") and not lines[start - 1].startswith("# ----"):
        start -= 1
    if banners and start > first + 1 and not lines[start - 1].strip() and lines[start - 2].startswith("# ----"):
        start -= 2  # the section banner right above: kept with its first statement
    return "\n".join(lines[start:node.end_lineno])


def kept_source(source: str, tree: ast.Module, keep: set[int]) -> str:
    """The module's banner comment and its kept statements, each with the comment lines right above
    it; one blank line between top-level statements (the whole kernel, front and machinery, reads as
    one file), none between statements the module itself writes together (a block of constants)."""
    lines = source.splitlines()
    first = first_line(tree)
    banner = [ln for ln in lines[:first] if ln.startswith("#")]
    body, last = "", None
    for node in tree.body:
        if id(node) in keep:
            text = statement_source(lines, node, first)
            start = node.end_lineno - text.count("\n")  # the line its text (comments included) starts on
            together = last is not None and start == last.end_lineno + 1
            body += ("\n" if together else "\n\n") + text if body else text
            last = node
    return "\n".join(banner) + ("\n\n" if banner else "") + body


def summarised(source: str, tree: ast.Module, kept: list[int]) -> tuple[str, ast.Module, list[str]]:
    """The module's kept statements (indices into tree.body) with their docstrings as the collapsed
    machinery carries them, re-parsed: a function or class whose docstring is its whole body (an
    exception class) keeps its summary (the first paragraph, else the first sentence) on one line;
    every other docstring is left out (the whole text stays in dogkit/core).
    Also the summaries that do not fit on a line of LINE_LENGTH, each named (the build refuses them)."""
    lines, cuts, too_long = source.splitlines(), [], []
    for node in (n for i in kept for n in ast.walk(tree.body[i])):
        body = getattr(node, "body", None)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not body:
            continue
        doc = body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        if len(body) > 1:  # left out, with the blank line that set it off from the code (a class's)
            blank_after = not lines[doc.end_lineno].strip()
            cuts.append((doc.lineno, doc.end_lineno + blank_after, None))
            continue
        if doc.end_lineno == doc.lineno:
            continue
        raw = "\n".join(lines[doc.lineno - 1:doc.end_lineno])  # as written: escapes stay escapes
        indent, prefix, quote = re.match(r'(\s*)([rRuU]?)("""|\'\'\')', raw).groups()
        inner = raw.strip()[len(prefix) + 3:-3]
        text = " ".join(re.split(r"\n\s*\n", inner)[0].split())  # PEP 257: the summary line's paragraph
        end = SENTENCE_END.search(text)
        line = f"{indent}{prefix}{quote}{text[:end.end()] if end else text}{quote}"
        if len(line) > LINE_LENGTH:
            too_long.append(f"{node.name} (line {doc.lineno}: its first sentence makes a line of {len(line)})")
        cuts.append((doc.lineno, doc.end_lineno, line))
    for first, last, line in sorted(cuts, reverse=True):
        lines[first - 1:last] = [line] if line is not None else []
    text = "\n".join(lines) + "\n"
    return text, ast.parse(text), too_long


def picked_source(title: str, picks, sources: dict[str, str], trees: dict[str, ast.Module]) -> tuple[str, set[int]]:
    """A front section made of statements picked by name out of their modules, in the order named,
    under its own banner; (its text, the ids of the statements it took)."""
    chunks, taken = [], set()
    for module, names in picks:
        lines, tree = sources[module].splitlines(), trees[module]
        by_name = {n: node for node in tree.body for n in defined_names(node)}
        for name in names:
            if name not in by_name:
                raise SystemExit(f"build_kernel: FRONT names {name}, which {module} does not define")
            chunks.append(statement_source(lines, by_name[name], first_line(tree), banners=False))
            taken.add(id(by_name[name]))
    return f"{RULE}\n# {title}\n{RULE}\n\n" + "\n\n".join(chunks), taken


def lift_settings(source: str, name: str) -> tuple[str, str]:
    """Cut the `NAME = dict(...)` assignment, with its comments, out of a module; (assignment, rest)."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            lines = source.splitlines()
            end = node.end_lineno
            assign = "\n".join(lines[node.lineno - 1:end])
            rest = "\n".join(lines[:node.lineno - 1] + lines[end:])
            return assign, rest
    raise SystemExit(f"build_kernel: {name} not found in the model's module")


def render_imports(nodes: list[ast.stmt]) -> str:
    plain: set[str] = set()
    froms: dict[str, set[str]] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if not a.name.startswith("dogkit"):
                    plain.add(a.name if a.asname is None else f"{a.name} as {a.asname}")
        elif node.module and not node.module.startswith("dogkit"):
            froms.setdefault(node.module, set()).update(
                a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)

    def top(name):
        return name.split(" ")[0].split(".")[0]

    def group(third_party):
        keep = lambda n: (top(n) in ALLOWED_THIRD_PARTY) == third_party  # noqa: E731
        out = [f"import {n}" for n in sorted(plain, key=str.lower) if keep(n)]
        out += [f"from {m} import {', '.join(sorted(froms[m], key=str.lower))}"
                for m in sorted(froms, key=str.lower) if keep(m)]
        return out

    return "\n".join(group(False)) + "\n\n" + "\n".join(group(True))


def header(entry: registry.ModelEntry) -> str:
    cls = entry.cls.__name__
    return f'''#!/usr/bin/env python
"""Generative Dog Images: {entry.name} ({entry.summary}).

On Kaggle: attach the competition data, run all; the kernel cleans the photos (one crop per
annotated dog), trains within Kaggle's limit minus 15 minutes, samples 10,000 dogs from the EMA
generator and writes /kaggle/working/images.zip.

Locally, with any budget (PATH: Kaggle/Stanford layout, breed folders, a flat folder, or a cache
written by `dogkit clean-data`):

    python kernels/{entry.name}.py --data PATH --budget 8m --out submission/

Everything is a function of the wall clock, so the same file adapts to any GPU (or the CPU);
with several GPUs (Kaggle's T4 x2) it trains on all of them, one process each (--gpus 1: one).
Edit it as you like: the settings below (each with its source), the model class {cls} and its
step (loss.backward(); opt.step() written by hand still averages over several GPUs). To bring an
edit back into dogkit, copy the changed code into dogkit/core (the model: dogkit/core/models/) and
run `python tools/build_kernel.py --model {entry.name}`, which wrote this file from dogkit {__version__}.
"""'''


SAFETY_MARGIN_S = KAGGLE_MARGIN


def hours_minutes(seconds: float) -> str:
    """31500 -> '8h45m' (what parse_budget reads back)."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")


def sessions_block(sessions: int) -> str:
    """The settings block's KAGGLE_SESSIONS, with what it means for a reader on Kaggle."""
    return ("\n\n# Kaggle sessions this run is planned over, each within the time limit. 1: one kernel run, the\n"
            "# competition's rule. N > 1: each session writes images.zip and checkpoint.pt; the next, run with this\n"
            "# notebook's output attached (Add Input -> Your Work), continues it; the last anneals the learning rate.\n"
            f"KAGGLE_SESSIONS = {sessions}")


def other_settings_block(entry) -> str:
    """The settings block's list of what else the model reads, at their defaults, each with its help
    (settings.model_settings): every knob of the model and its recipe in one place."""
    from dogkit.core.settings import model_settings

    rows = [row for row in model_settings(entry.name) if row[0] not in entry.settings]
    width = max(len(f"{n}={d!r}") for n, d, *_ in rows)
    return (f"\n# Also read by {entry.name}, at their defaults (add any above, or --lr-final 0.1 style; ranges: SETTINGS):\n"
            + "\n".join(f"#   {f'{n}={d!r}':<{width}}  {text}" for n, d, _, _, text in rows))


def preset_block(presets: dict) -> str:
    """The settings block's PRESET: which published recipe (above) the run follows, if any."""
    names = " or ".join(f'"{n}"' for n in presets)
    return ("\n\n# None: the settings above; " + names + ": that preset over them (--preset NAME; options win).\n"
            "PRESET = None")


def build(name: str, budget: str = "9h", sessions: int = 1) -> str:
    """The kernel's text. budget: Kaggle's limit; the kernel plans for it minus 15 minutes.
    sessions: the Kaggle sessions a run is planned over (KAGGLE_SESSIONS)."""
    from dogkit.core.settings import parse_budget

    seconds = parse_budget(budget) - SAFETY_MARGIN_S
    if seconds <= 0:
        raise SystemExit(f"build_kernel: budget {budget} leaves nothing after the 15-minute margin")
    entry = registry.get(name)
    settings_name = next(k for k, v in vars(inspect.getmodule(entry.cls)).items() if v is entry.settings)
    modules = module_order([entry.cls.__module__, ENTRY_MODULE])
    sources = {m: inspect.getsource(importlib.import_module(m)) for m in modules}
    if sessions < 1:
        raise SystemExit(f"build_kernel: --sessions {sessions}: give 1 or more")
    settings_code, sources[entry.cls.__module__] = lift_settings(sources[entry.cls.__module__], settings_name)
    settings_code += other_settings_block(entry)
    presets_name = next((k for k, v in vars(inspect.getmodule(entry.cls)).items() if v is entry.presets), None)
    if entry.presets:
        presets_code, sources[entry.cls.__module__] = lift_settings(sources[entry.cls.__module__], presets_name)
        settings_code += "\n\n" + presets_code + preset_block(entry.presets)
    settings_code += sessions_block(sessions)
    trees = {m: ast.parse(src) for m, src in sources.items()}
    keep = reachable(trees, {entry.cls.__name__, "main"} | used_names(ast.parse(settings_code)))
    all_imports = [n for m in modules if any(id(x) in keep for x in trees[m].body)
                   for n in trees[m].body if isinstance(n, (ast.Import, ast.ImportFrom))]
    whole = [entry.cls.__module__ if m == "model" else m for m, picks in FRONT if picks is None]
    front, taken = [], set()
    for mod_name, picks in FRONT:
        if picks is None:
            mod_name = entry.cls.__module__ if mod_name == "model" else mod_name
            if any(id(n) in keep for n in trees[mod_name].body):
                front.append(kept_source(sources[mod_name], trees[mod_name], keep))
        else:
            text, ids = picked_source(mod_name, picks, sources, trees)
            front.append(text)
            taken |= ids
    back, too_long = [], []
    for m in modules:  # the machinery: each statement as written, its docstrings cut to their summary line
        kept = [i for i, n in enumerate(trees[m].body) if id(n) in keep - taken]
        if m not in whole and kept:
            text, tree, long_ones = summarised(sources[m], trees[m], kept)
            back.append(kept_source(text, tree, {id(tree.body[i]) for i in kept}))
            too_long += [f"{m}.{name}" for name in long_ones]
    if too_long:
        raise SystemExit("build_kernel: a machinery docstring's first sentence must fit on one line of "
                         f"{LINE_LENGTH}: {'; '.join(too_long)}")
    sections = front + [MACHINERY] + back
    settings_block = (
        "# ---------------------------------------------------------------------------------------------\n"
        "# Settings: the model's hyper-parameters (any setting of SETTINGS below can go here)\n"
        "# ---------------------------------------------------------------------------------------------\n"
        + settings_code
    )
    presets_args = f", presets={presets_name}, preset=PRESET" if entry.presets else ""
    run = (
        "\n\n\nif __name__ == \"__main__\":\n"
        f"    main({entry.cls.__name__}, {settings_name}, kaggle_budget=\"{hours_minutes(seconds)}\", "
        f"kaggle_sessions=KAGGLE_SESSIONS{presets_args})  # Kaggle allows {budget} a session: 15 minutes to spare\n"
    )
    imports = render_imports(used_imports(all_imports, "\n".join(sections) + "\n" + settings_code))
    parts = [imports, settings_block, *sections]
    return with_contents(header(entry) + "\n" + "\n\n\n".join(p.strip("\n") for p in parts) + run)


RULE = "# " + "-" * 93


def with_contents(text: str) -> str:
    """The kernel with a table of contents at the end of its docstring: each section's title (the
    line between two full-width rules) and the line it starts on, for a reader scrolling on Kaggle."""
    lines = text.splitlines()
    titles = [(i, lines[i][2:].split(":")[0]) for i in range(1, len(lines) - 1)
              if lines[i - 1] == RULE and lines[i + 1] == RULE and lines[i] != RULE]
    titles += [(i, "MACHINERY (below: nothing to read to change the model)") for i, line in enumerate(lines)
               if line.startswith("# MACHINERY.")]
    titles.sort()
    end = lines.index('"""', 1)  # the docstring's closing line
    shift = len(titles) + 2
    contents = ["", "Contents (line numbers):"] + [f"  {i + shift:5d}  {title}" for i, title in titles]
    return "\n".join(lines[:end] + contents + lines[end:]) + "\n"


def used_imports(nodes: list[ast.stmt], code: str) -> list[ast.stmt]:
    """The import statements, each keeping only the names the kept code uses."""
    used = used_names(ast.parse(code)) | {n.value.id for n in ast.walk(ast.parse(code))
                                          if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    out = []
    for node in nodes:
        names = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
        if names:
            clone = ast.ImportFrom(node.module, names, node.level) if isinstance(node, ast.ImportFrom) else ast.Import(names)
            out.append(clone)
    return out


def notebook_intro(name: str, budget: str, sessions: int) -> str:
    """The notebook's first cell: what it does, what to attach, where the result is, how to score it."""
    from dogkit.core.settings import parse_budget

    train = hours_minutes(parse_budget(budget) - SAFETY_MARGIN_S)
    several = (f"\n\nThis run is planned over **{sessions} sessions** (`KAGGLE_SESSIONS` below): from the second "
               "on, attach this notebook's own output (Add Input > Your Work) and run it again; it continues "
               "from its `checkpoint.pt`.") if sessions > 1 else ""
    return f"""# Generative Dog Images: {name}, trained by dogkit

One notebook, nothing to install: it cleans the competition's photos (one crop per annotated dog), trains
the **{name}** generator, samples 10,000 dogs and writes **`/kaggle/working/images.zip`** (the Output tab,
once the version has run), all within **{train}** (Kaggle allows {budget}: 15 minutes to spare).

1. **Add data**: the competition *Generative Dog Images* (or the Stanford Dogs dataset). Anything else
   attached is ignored, and the log says so.
2. **Accelerator**: *GPU T4 x2* (it trains on both). Not *P100*: today's Kaggle image cannot run it, and the
   notebook stops at once with a line saying so. Internet can stay off.
3. **Save Version > Save & Run All**. The first lines say what was found and chosen (software, GPU, data,
   settings, plan), then a line every 5 minutes and, now and then, a grid of samples; the final samples
   and the loss curves come last.

To run it elsewhere, set `sys.argv` in a cell above the last one, e.g.
`sys.argv = ["kernel", "--data", "photos/", "--budget", "8m", "--out", "submission/"]`.
Score the zip at home with the competition's metric: `dogkit score images.zip --reference ref.npz`
(see dogkit's README).{several}"""


SUB_BANNER = "# ---- "  # a part of a machinery section (dogkit/core/train.py's the plan, the end ...)
HIDDEN = {"_kg_hide-input": True}  # Kaggle's collapsed code cell: still run, its code folded away


def notebook(text: str, intro: str) -> dict:
    """The kernel as a notebook (nbformat 4.5): the intro, then the settings cell (header, imports,
    settings), then per section of the contents a heading and its code, then the cell that runs it.
    Past the MACHINERY line every code cell is collapsed on Kaggle (HIDDEN) and a section is cut at
    its parts' banners into cells of a readable size. The code cells joined are exactly `text`."""
    lines = text.splitlines(keepends=True)
    machinery = next(i for i, line in enumerate(lines) if line.startswith("# MACHINERY.")) - 1
    starts = [i for i in range(1, len(lines) - 2) if lines[i].rstrip("\n") == RULE
              and lines[i + 2].rstrip("\n") == RULE and lines[i + 1].rstrip("\n") != RULE]
    parts = [i for i in range(machinery, len(lines)) if lines[i].startswith(SUB_BANNER)]
    run_at = max(i for i, line in enumerate(lines) if line.startswith("if __name__ == "))
    bounds = sorted(set([0] + starts[1:] + [machinery] + parts + [run_at, len(lines)]))  # Settings stays with the imports
    cells, number = [("markdown", intro, {})], 0
    for a, b in zip(bounds, bounds[1:]):
        hide = HIDDEN if machinery <= a < run_at else {}
        if a == run_at:
            cells.append(("markdown", "## Run\nEverything above only defines; this cell trains and writes images.zip.", {}))
        elif a == machinery:
            cells.append(("markdown", "## Machinery\nThe cells below keep a 9-hour run alive (data, the machine, several "
                                      "GPUs, sampling, checkpoints, the time plan, the end): collapsed, and nothing in "
                                      "them needs reading to change the settings, the model or the recipe above.", {}))
        elif lines[a].startswith(SUB_BANNER):
            cells.append(("markdown", "#### " + lines[a][len(SUB_BANNER):].rstrip("- \n").capitalize(), {}))
        elif a:
            number += 1
            title, _, what = lines[a + 1][2:].strip().partition(": ")
            cells.append(("markdown", f"## {number}. {title}\n{what[:1].upper() + what[1:] if what else ''}".rstrip(), {}))
        cells.append(("code", "".join(lines[a:b]), hide))
    return {"cells": [dict({"cell_type": kind, "id": f"cell-{i:02d}", "metadata": dict(meta), "source": source},
                           **({"execution_count": None, "outputs": []} if kind == "code" else {}))
                      for i, (kind, source, meta) in enumerate(cells)],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def notebook_text(text: str, name: str, budget: str = "9h", sessions: int = 1) -> str:
    return json.dumps(notebook(text, notebook_intro(name, budget, sessions)), indent=1, ensure_ascii=False) + "\n"


COMPETITION = "generative-dog-images"
MACHINE_SHAPE = "NvidiaTeslaT4"  # "GPU T4 x2"; enable_gpu alone gets a P100, which today's image cannot run


def slugify(title: str) -> str:
    """Kaggle's slug of a title: lower case, runs of anything else than letters and digits -> '-'."""
    return "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())


def kaggle_user(given: str | None) -> str | None:
    """--user, else KAGGLE_USERNAME, else the username in ~/.kaggle/kaggle.json (the CLI's own file)."""
    if given:
        return given
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    try:
        return json.loads(config.read_text()).get("username")
    except (OSError, ValueError):
        return None


def kernel_metadata(user: str, title: str, code_file: str, continues: bool = False, kind: str = "script") -> dict:
    """kernel-metadata.json for this competition: private, GPU T4 x2, internet off (written out:
    the CLI turns it on when the key is absent), the competition's data attached; continues: the
    notebook's own output attached too (a run's second and later sessions)."""
    ref = f"{user}/{slugify(title)}"
    return {"id": ref, "title": title, "code_file": code_file, "language": "python",
            "kernel_type": kind, "is_private": True, "enable_gpu": True, "enable_internet": False,
            "machine_shape": MACHINE_SHAPE, "competition_sources": [COMPETITION], "dataset_sources": [],
            "kernel_sources": [ref] if continues else []}


def write_atomically(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    tmp.replace(path)


def write_kaggle_folder(folder: Path, model: str, text: str, user: str, title: str, continues: bool = False,
                        notebook_json: str | None = None) -> list[str]:
    """DIR/<slug>.py (or, given notebook_json, DIR/<slug>.ipynb) and DIR/kernel-metadata.json;
    returns the commands that follow."""
    slug = slugify(title)
    if not slug:
        raise ValueError(f"--title {title!r}: needs letters or digits")
    folder.mkdir(parents=True, exist_ok=True)
    code_file, kind = (f"{slug}.ipynb", "notebook") if notebook_json else (f"{slug}.py", "script")
    meta = kernel_metadata(user, title, code_file, continues, kind)
    for name, content in ((code_file, notebook_json or text), ("kernel-metadata.json", json.dumps(meta, indent=2) + "\n")):
        write_atomically(folder / name, content)
    ref = meta["id"]
    return [f"kaggle kernels push -p {folder} --accelerator {MACHINE_SHAPE}",
            f"kaggle kernels status {ref}",
            f"kaggle kernels output {ref} -p {folder}/output"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=registry.MODEL_NAMES)
    parser.add_argument("--budget", default="9h", help="Kaggle's time limit (default 9h; 15 min are kept)")
    parser.add_argument("-o", "--out", default=None, help="default: kernels/MODEL.py")
    parser.add_argument("--kaggle", default=None, metavar="DIR",
                        help="write a folder for `kaggle kernels push`: DIR/<slug>.py and kernel-metadata.json")
    parser.add_argument("--user", default=None, help="your Kaggle user name (default: KAGGLE_USERNAME or "
                                                     "~/.kaggle/kaggle.json)")
    parser.add_argument("--title", default=None, help="the notebook's title (default: 'dogkit MODEL')")
    parser.add_argument("--sessions", type=int, default=1, help="Kaggle sessions a run is planned over, each "
                        "continuing the last (default 1: the competition's rule)")
    parser.add_argument("--continue", dest="continues", action="store_true", help="with --kaggle: attach the "
                        "notebook's own output (kernel_sources), for the second and later sessions")
    parser.add_argument("--notebook", action="store_true", help="with --kaggle: push the .ipynb (kernel_type "
                        "notebook: sections, pictures in the output) instead of the .py script")
    args = parser.parse_args(argv)
    if args.notebook and not args.kaggle:
        parser.error("--notebook goes with --kaggle DIR (kernels/MODEL.ipynb is always written beside the .py)")
    if args.continues and not (args.kaggle and args.sessions > 1):
        parser.error("--continue goes with --kaggle DIR and --sessions 2 or more")
    if args.kaggle:
        user = kaggle_user(args.user)
        if not user:
            parser.error("--kaggle needs your Kaggle user name: --user NAME (or KAGGLE_USERNAME, or the "
                         "username in ~/.kaggle/kaggle.json)")
        text = build(args.model, args.budget, args.sessions)
        nb = notebook_text(text, args.model, args.budget, args.sessions) if args.notebook else None
        try:
            steps = write_kaggle_folder(Path(args.kaggle), args.model, text, user, args.title or f"dogkit {args.model}",
                                        args.continues, nb)
        except ValueError as exc:
            parser.error(str(exc))
        attached = "the competition and this notebook's output attached" if args.continues else "the competition attached"
        print(f"wrote {args.kaggle}: the kernel and kernel-metadata.json (private, GPU T4 x2, internet off, "
              f"{attached}). Then:\n  " + "\n  ".join(steps))
        if args.sessions > 1 and not args.continues:
            print(f"For sessions 2 to {args.sessions}, once the first has finished: the same command with --continue "
                  f"(attaches this notebook's output), then the same push.")
        return 0
    out = Path(args.out) if args.out else ROOT / "kernels" / f"{args.model}.py"
    text = build(args.model, args.budget, args.sessions)
    compile(text, str(out), "exec")  # never write a kernel that does not parse
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, text)
    write_atomically(out.with_suffix(".ipynb"), notebook_text(text, args.model, args.budget, args.sessions))
    print(f"wrote {out} ({len(text.splitlines())} lines) and {out.with_suffix('.ipynb')} (the same code as a notebook)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
