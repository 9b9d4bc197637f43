"""`dogkit report`: why a submission scores what it scores, as PNGs, report.html and report.json.

Libraries: matplotlib draws the figures (histograms, curves), scikit-learn fits the breed
classifier (multinomial logistic regression on standardised pool_3 features): both are well kept
and do these jobs better than hand-rolled code would.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from dogkit.core.data import read_file
from dogkit.core.data import atomic_path
from dogkit.core.sample import save_grid
from dogkit.metrics import fid as F
from dogkit.metrics import fidelity

MEANINGS = {
    "fid": "Frechet distance between Gaussians fitted to real and generated features (lower is better).",
    "distance": "Memorization distance d: mean over generated images of 1 - |cos| to the nearest real one.",
    "mifid": "The leaderboard number: FID, divided by d when d < 0.1 (near-copies are punished).",
    "precision": "Share of generated images that fall inside the real images' k-NN manifold (fidelity).",
    "recall": "Share of real images that fall inside the generated images' k-NN manifold (diversity).",
    "density": "How many real neighbourhoods hold each generated image, 1 when the sets match (fidelity).",
    "coverage": "Share of real neighbourhoods that hold at least one generated image (diversity).",
    "kid": "Kernel Inception Distance: unbiased MMD^2 with a cubic kernel, unbiased at any sample size.",
    "breed_accuracy": "Held-out accuracy of the breed classifier on real photos (how much to trust the breeds).",
    "breed_entropy": "Entropy (bits) of the predicted breed histogram; log2({n}) = {max:.1f} is all {n} breeds the "
                     "reference knows equally.",
    "mean_top1_confidence": "Mean top-1 breed probability: low values mean dogs of no recognisable breed.",
}


NO_BREEDS = ("Not drawn: the reference holds {labelled} photos in {n} breed folder(s); the breed classifier needs "
             "at least 2 breeds and 5 photos per breed, read from <synset>-<breed>/ folder names. Build the "
             "reference from such a folder, e.g. `dogkit reference ../shared/data/stanford-dogs-crops -o "
             "data/ref.npz`.")


def breed_labels(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Breed of each reference photo from its '<synset>-<breed>/' folder; -1 when unknown."""
    folders = [n.split("/")[0] if "/" in n else "" for n in names]
    breeds = sorted({f for f in folders if f.startswith("n") and "-" in f})
    index = {b: i for i, b in enumerate(breeds)}
    return np.array([index.get(f, -1) for f in folders]), breeds


def breed_analysis(ref_features, ref_names, gen_features, seed=0) -> dict | None:
    """Fit a linear breed classifier on the reference, report its held-out accuracy, then the
    submission's breed histogram, entropy, top-5 and mean top-1 confidence."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels, breeds = breed_labels(ref_names)
    keep = labels >= 0
    if len(breeds) < 2 or keep.sum() < 5 * len(breeds):
        return None  # too few labelled photos to fit a breed classifier
    x, y = ref_features[keep], labels[keep]
    counts = np.bincount(y)
    stratify = y if counts.min() >= 2 else None
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=stratify)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    clf.fit(xtr, ytr)
    accuracy = float(clf.score(xte, yte))
    prob = clf.predict_proba(gen_features)
    pred = clf.classes_[prob.argmax(axis=1)]
    hist = np.bincount(pred, minlength=len(breeds))
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    top = np.argsort(-hist)[:5]
    return {"breed_accuracy": accuracy, "breed_entropy": entropy,
            "mean_top1_confidence": float(prob.max(axis=1).mean()),
            "top5": [{"breed": breeds[i], "share": float(p[i])} for i in top],
            "histogram": hist.tolist(), "breeds": breeds}


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _hist_plot(nearest, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(nearest, bins=60, color="#4a7ab5")
    ax.axvline(F.MEMORIZATION_THRESHOLD, color="#c0392b", linestyle="--", label="0.1 threshold")
    ax.set_xlabel("nearest-reference distance 1 - |cos|")
    ax.set_ylabel("generated images")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _breed_plot(breeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = np.array(breeds["histogram"])
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    ax.bar(np.arange(len(hist)), hist, color="#6a9f58")
    ax.set_xlabel("breed (sorted by synset)")
    ax.set_ylabel("generated images")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


MAX_LOG_BYTES = 256 << 20


def _plain(value) -> bool:
    """A log value a report can show: text, or a finite number (never a list, an object, NaN)."""
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value))


def read_log(run: Path) -> list[dict]:
    """The records of run/log.jsonl with a finite numeric step, each keeping only its plain values
    (_plain); [] when there is none. A run killed mid-write (a Kaggle session's end) can leave a
    half line: skipped. A log that is not a regular file of at most MAX_LOG_BYTES: DataError."""
    log = run / "log.jsonl"
    if not log.exists():
        return []
    rows = []
    for line in read_file(log, MAX_LOG_BYTES).decode("utf-8", "replace").splitlines():
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):  # a half line; a nesting too deep to parse
            continue
    rows = [{k: v for k, v in r.items() if _plain(v)} for r in rows if isinstance(r, dict)]
    return [r for r in rows if isinstance(r.get("step"), (int, float))]


def session_starts(rows: list[dict]) -> list[tuple[int, float]]:
    """(session, its first logged step) for every session after the first of a run continued
    over several (the records' "session"; logs without it are one session)."""
    starts, last = [], None
    for r in rows:
        session = r.get("session", 1)
        if last is not None and session != last:
            starts.append((session, r["step"]))
        last = session
    return starts


def _curves_plot(run: Path, path) -> str | None:
    """curves.png from run/log.jsonl, a dashed line where each later session took over; its
    caption, or None when the log has no curves."""
    rows = read_log(run)
    keys = sorted({k for r in rows for k in r if k.startswith("loss") or k in ("mifid", "fid")})
    if not rows or not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), label=k)
    starts = session_starts(rows)
    for session, step in starts:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"session {session}", (step, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                    ha="left", va="top")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    caption = f"From {run}/log.jsonl."
    if starts:
        caption += (f" One run over {len(starts) + 1} sessions, continued at step "
                    + ", ".join(f"{step:g} (session {session})" for session, step in starts) + ".")
    return caption


def _pairs_image(pixels, ref_images, order, nearest, index, path, n=8):
    """Closest pairs side by side: generated | nearest real (ref_images: {row: pixels}), distance below."""
    from PIL import ImageDraw

    pick = order[:n]
    canvas = Image.new("RGB", (2 * 64 + 6, len(pick) * 78), "white")
    draw = ImageDraw.Draw(canvas)
    for row, i in enumerate(pick):
        canvas.paste(Image.fromarray(pixels[i]), (0, row * 78))
        if ref_images is not None:
            canvas.paste(Image.fromarray(ref_images[index[i]]), (70, row * 78))
        draw.text((0, row * 78 + 64), f"d = {nearest[i]:.3f}", fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp)


def build_report(images, gen_features, reference, out: Path, run: Path | None = None,
                 ref_images_loader=None) -> dict:
    """Write the PNGs, report.html and report.json into out; return the numbers."""
    out.mkdir(parents=True, exist_ok=True)
    gen = np.asarray(gen_features)
    numbers = F.score_features(gen, reference.mu, reference.sigma, reference.features)  # what `dogkit score` says
    nearest, index = F.nearest_neighbours(gen, reference.features)  # rows of zero features are dropped
    numbers.update(fidelity.manifold_metrics(reference.features, gen))
    numbers.update(fidelity.kid(reference.features, gen, subsets=50, subset_size=min(1000, len(gen))))
    pixels = images.pixels[gen.sum(axis=1) != 0]  # aligned with nearest / index
    order = np.argsort(nearest)
    numbers["below_threshold"] = int((nearest < F.MEMORIZATION_THRESHOLD).sum())

    save_grid(images.pixels[:100], out / "grid.png", nrow=10)
    _hist_plot(nearest, out / "memorization.png")
    ref_images = ref_images_loader(sorted(set(index[order[:8]].tolist()))) if ref_images_loader else None
    _pairs_image(pixels, ref_images, order, nearest, index, out / "closest_pairs.png")
    breeds = breed_analysis(reference.features, reference.names, gen)
    if breeds:
        _breed_plot(breeds, out / "breeds.png")
        numbers.update({k: breeds[k] for k in ("breed_accuracy", "breed_entropy", "mean_top1_confidence")})
        numbers["reference_breeds"] = len(breeds["breeds"])
        numbers["top5"] = breeds["top5"]
    curves = _curves_plot(run, out / "curves.png") if run else None

    with atomic_path(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(numbers, indent=2))
    sections = [("Samples", "grid.png", "The first 100 images of the submission, in file order."),
                ("Memorization audit", "memorization.png",
                 f"{numbers['below_threshold']} of {numbers['n_images']} images sit closer than 0.1 to a real photo."),
                ("Closest pairs", "closest_pairs.png", "Generated (left) and its nearest real photo (right).")]
    if breeds:
        sections.append(("Breeds", "breeds.png", "Predicted breed of each generated image."))
    else:
        labels, breed_names = breed_labels(reference.names)
        sections.append(("Breeds", None, NO_BREEDS.format(labelled=int((labels >= 0).sum()), n=len(breed_names))))
    if curves:
        sections.append(("Training curves", "curves.png", curves))
    n_breeds = numbers.get("reference_breeds", 120)
    meanings = {k: v.format(n=n_breeds, max=math.log2(max(n_breeds, 1))) for k, v in MEANINGS.items()}
    rows = "".join(f"<tr><td>{k}</td><td>{numbers[k]:.4f}</td><td>{html.escape(meanings.get(k, ''))}</td></tr>"
                   for k in ("fid", "distance", "mifid", "kid", "precision", "recall", "density", "coverage",
                             "breed_accuracy", "breed_entropy", "mean_top1_confidence") if k in numbers)
    if "kid_std" in numbers:
        rows += f"<tr><td>kid_std</td><td>{numbers['kid_std']:.5f}</td><td>Standard deviation of KID over subsets.</td></tr>"
    top5 = "".join(f"<li>{html.escape(t['breed'])}: {100 * t['share']:.1f}%</li>" for t in numbers.get("top5", []))
    body = "".join(f"<h2>{html.escape(t)}</h2><p>{html.escape(c)}</p>"
                   + (f"<img src='data:image/png;base64,{_png(out / f)}'>" if f else "") for t, f, c in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>dogkit report</title>"
            f"<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td{{padding:2px 8px}}"
            f"img{{max-width:100%}}</style></head><body><h1>dogkit report: {html.escape(images.source)}</h1>"
            f"<h2>Numbers</h2><table>{rows}</table>"
            + (f"<h2>Top-5 breeds</h2><ol>{top5}</ol>" if top5 else "") + body + "</body></html>")
    with atomic_path(out / "report.html") as tmp:
        Path(tmp).write_text(page)
    return numbers
