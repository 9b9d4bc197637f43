"""The kernels where Kaggle runs them: inside a real Jupyter kernel (nbclient + ipykernel, the
machinery of Kaggle's notebooks), the .py pasted as one code cell as the README says, or the
.ipynb as built; a first cell sets sys.argv to point it at local data, as a user would. Tiny data,
a short budget, the CPU."""
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat, nbclient and ipykernel are test dependencies")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from dogkit.metrics.submission import load_submission  # noqa: E402

from test_kaggle import competition_zips, jpeg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = ["--device", "cpu", "--width", "4", "--batch-size", "8"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 photos in two breed folders: what the kernel cleans (a cache would do as well)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / ("n02085620-Chihuahua" if i % 2 else "n02099601-golden_retriever")
        folder.mkdir(exist_ok=True)
        (folder / f"{folder.name[:9]}_{i}.jpg").write_bytes(jpeg(rng, 80, 80))
    return root


def argv_cell(*args, env=None):
    """The cell a user adds above the kernel: its arguments (and, for tests, environment)."""
    lines = ["import os, sys", f"sys.argv = {['kernel', *map(str, args)]!r}"]
    lines += [f"os.environ[{k!r}] = {v!r}" for k, v in (env or {}).items()]
    return nbformat.v4.new_code_cell("\n".join(lines))


def kernel_cell(name):
    return nbformat.v4.new_code_cell((ROOT / "kernels" / f"{name}.py").read_text())


def execute(cells, timeout=600, during=None, cwd=None):
    """Run the cells in a fresh Jupyter kernel (errors kept as outputs); during(client) runs in this
    thread while the notebook executes. Returns the executed cells."""
    nb = nbformat.v4.new_notebook(cells=cells)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(cwd or ROOT)}})
    # ipykernel forwards what forked processes write to fds 1 and 2 into the cell, as on Kaggle,
    # except under pytest (it looks for PYTEST_CURRENT_TEST): the kernel is started without it
    hidden = os.environ.pop("PYTEST_CURRENT_TEST", None)
    try:
        if during is None:
            client.execute()
            return nb.cells
        worker = threading.Thread(target=client.execute)
        worker.start()
        try:
            during(client)
        finally:
            worker.join(timeout)
        return nb.cells
    finally:
        if hidden is not None:
            os.environ["PYTEST_CURRENT_TEST"] = hidden


def text_of(cell, name=None):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and name in (None, o.name))


def errors_of(cell):
    return [o for o in cell.outputs if o.output_type == "error"]


def pictures(cell):
    return [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def assert_no_traceback(cells):
    for cell in cells:
        dump = json.dumps(cell.get("outputs", []))
        assert "Traceback" not in dump and "An exception has occurred" not in dump, dump[-3000:]


@pytest.mark.slow
def test_the_py_pasted_into_one_cell_trains_and_shows_its_pictures(photos, tmp_path):
    out = tmp_path / "out"
    cells = execute([argv_cell("--data", photos, "--budget", "1h", "--steps", "8", "--out", out, "--log-every", "0",
                               "--n-samples", "64", *TINY), kernel_cell("dcgan")])
    run = cells[1]
    assert errors_of(run) == [], run.outputs
    assert_no_traceback(cells)
    assert text_of(run, "stderr") == "", text_of(run, "stderr")  # no warning shown as a red block
    log = text_of(run)
    assert log.startswith("python     ") and "device     cpu" in log and "budget     1h00m" in log, log
    assert log.rstrip().splitlines()[-1].startswith("next       score it with the competition's metric"), log[-2000:]
    assert "\r" not in log, log  # one line per interval: nothing that floods a saved notebook
    assert load_submission(out / "images.zip", strict=True, n_images=64).pixels.shape == (64, 64, 64, 3)
    assert len(pictures(run)) == 1, run.outputs  # the final samples, in the cell's output


@pytest.mark.slow
def test_the_ipynb_as_built_runs_with_a_cell_of_arguments_and_shows_the_interval_grids(photos, tmp_path):
    nb = nbformat.read(ROOT / "kernels" / "biggan.ipynb", as_version=4)
    nbformat.validate(nb)
    out = tmp_path / "out"
    run_at = len(nb.cells) - 1
    cells = list(nb.cells[:run_at]) + [argv_cell("--data", photos, "--budget", "1h", "--steps", "6", "--out", out,
                                                 "--log-every", "0", "--n-samples", "64", *TINY)] + [nb.cells[run_at]]
    # every interval's grid in the output: a grid every second of this short run
    cells.insert(run_at, nbformat.v4.new_code_cell("BIGGAN_SETTINGS['grid_every'] = 0.5"))
    done = execute(cells)
    assert_no_traceback(done)
    errors = [(i, e.ename, e.evalue) for i, c in enumerate(done) if c.cell_type == "code" for e in errors_of(c)]
    assert errors == [], errors  # (cell, error, its text): which cell failed and how
    run = done[-1]
    assert "next       score it" in text_of(run), text_of(run)[-3000:]
    assert len(pictures(run)) >= 2, text_of(run)[-3000:]  # interval grids, the final samples
    assert len(load_submission(out / "images.zip", strict=False).names) == 64  # 10,000: tests/core/test_kaggle.py


def test_a_refusal_is_exactly_one_line_in_the_cell_not_a_traceback(photos, tmp_path):
    nb = nbformat.read(ROOT / "kernels" / "gan.ipynb", as_version=4)
    defs, run = list(nb.cells[:-1]), nb.cells[-1]
    cases = [("--data", photos, "--budget", "5s", "--out", tmp_path / "a", *TINY),  # too short for its end
             ("--data", tmp_path / "nothing-here", "--out", tmp_path / "b", *TINY),  # no data
             ("--data", photos, "--budgte", "8m", *TINY)]  # a misspelt flag
    cells = defs + [c for args in cases for c in (argv_cell(*args), nbformat.v4.new_code_cell(run.source))]
    done = execute(cells)
    assert_no_traceback(done)
    runs = done[len(defs) + 1::2]
    for cell, want in zip(runs, ("budget", "nothing-here", "did you mean --budget?")):
        errors = errors_of(cell)
        assert len(errors) == 1 and len(errors[0]["traceback"]) == 1, cell.outputs
        line = errors[0]["traceback"][0]
        assert "\n" not in line.strip() and want in line, line
        assert text_of(cell, "stderr").strip() == "", text_of(cell, "stderr")  # the line is said once
    assert not (tmp_path / "b").exists(), runs[1].outputs


def test_two_cpu_ranks_forked_from_the_notebook_finish_and_leave_no_process(photos, tmp_path):
    out = tmp_path / "out"
    check = nbformat.v4.new_code_cell("import multiprocessing\nprint('children', len(multiprocessing.active_children()))")
    cells = execute([argv_cell("--data", photos, "--budget", "1h", "--steps", "4", "--out", out, "--n-samples", "200",
                               *TINY, env={"DOGKIT_CPU_RANKS": "2", "OMP_NUM_THREADS": "1"}),
                     kernel_cell("dcgan"), check])
    assert_no_traceback(cells)
    assert errors_of(cells[1]) == [], cells[1].outputs
    log = text_of(cells[1])
    assert "world      2 ranks (gloo)" in log, log  # a forked rank's output reaches the cell
    assert "next       score it" in log, log[-3000:]
    assert text_of(cells[2]).strip() == "children 0"
    assert len(load_submission(out / "images.zip", strict=False).names) == 200


@pytest.mark.slow
def test_a_second_session_continues_the_first_ones_attached_output(tmp_path):
    root, working = tmp_path / "input", tmp_path / "working"
    competition_zips(root / "generative-dog-images")
    working.mkdir()
    env = {"DOGKIT_KAGGLE_INPUT": str(root), "DOGKIT_KAGGLE_WORKING": str(working), "DOGKIT_KAGGLE_TMP": str(tmp_path / "t")}
    args = ("--budget", "10m", "--n-samples", "100", "--log-every", "0", "--sessions", "2", *TINY)
    first = execute([argv_cell(*args, "--steps", "4", env=env), kernel_cell("dcgan")])
    assert errors_of(first[1]) == [] and "continues  nothing yet" in text_of(first[1]), first[1].outputs
    shutil.copytree(working, root / "dogkit-dcgan")  # the first session's output, attached
    shutil.rmtree(working)
    working.mkdir()
    second = execute([argv_cell(*args, "--steps", "7", env=env), kernel_cell("dcgan")])
    assert_no_traceback(first + second)
    assert errors_of(second[1]) == [], second[1].outputs
    assert text_of(second[1]).startswith("continues  session 2 of 2, from "), text_of(second[1])[:2000]


def test_the_stop_button_leaves_a_checkpoint_and_a_line_saying_how_to_resume(photos, tmp_path):
    out = tmp_path / "out"

    def interrupt_once_training(client):
        deadline = time.monotonic() + 300
        while not (out / "log.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        os.kill(client.km.provisioner.pid, signal.SIGINT)  # what the notebook's stop button sends

    cells = execute([argv_cell("--data", photos, "--budget", "10m", "--out", out, "--log-every", "0", *TINY),
                     kernel_cell("dcgan")], during=interrupt_once_training)
    assert_no_traceback(cells)
    errors = errors_of(cells[1])
    assert len(errors) == 1 and "resume with --resume" in errors[0]["traceback"][0], cells[1].outputs
    assert (out / "checkpoint.pt").exists(), (sorted(os.listdir(out)), cells[1].outputs)


@pytest.mark.slow
def test_every_other_kernel_runs_in_the_real_kernel(photos, tmp_path):
    names = ["gan", "wgan-gp", "cvae", "sagan", "ralsgan"]
    cells = [c for name in names for c in (
        argv_cell("--data", photos, "--budget", "1h", "--steps", "2", "--n-samples", "64", "--out", tmp_path / name,
                  *TINY), kernel_cell(name))]
    done = execute(cells)
    assert_no_traceback(done)
    for name, cell in zip(names, done[1::2]):
        assert errors_of(cell) == [], (name, cell.outputs)
        assert len(load_submission(tmp_path / name / "images.zip", strict=False).names) == 64, name
