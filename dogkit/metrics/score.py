"""`dogkit score`: rules -> decode -> pool_3 features -> FID, memorization distance, MiFID."""
from __future__ import annotations

import time
from pathlib import Path

from dogkit.metrics import features as feat
from dogkit.metrics.cache import features_key, load_features, sample_rows, save_features
from dogkit.metrics.features import FEATURE_DIM
from dogkit.metrics.fid import MEMORIZATION_THRESHOLD, score_features
from dogkit.metrics.reference import Reference
from dogkit.metrics.submission import Images, load_submission


def score(source: str | Path | Images, reference: Reference, model, device, strict: bool = True,
          batch_size: int = 100, progress: bool = False, sqrtm: str = "auto", sample: int = 0,
          network_digest: str | None = None) -> dict:
    """MiFID of a submission (path, or images already checked by load_submission) against a
    reference; the result keys are fid.RESULT_KEYS plus sampled_from, seconds and notes. The
    distance matrix and (sqrtm "auto") the FID's matrix square root run on `device` when it is a
    GPU. sample > 0: only a seeded sample of that many images is scored (sampled_from: how many
    there were). network_digest: the features are kept in, and read from, the feature cache
    (dogkit.metrics.cache) under the images' and the network's content."""
    t0 = time.time()
    images = source if isinstance(source, Images) else load_submission(source, strict=strict)
    gen, notes = submission_features(images, model, device, batch_size, progress, sample, network_digest)
    result = score_features(gen, reference.mu, reference.sigma, reference.features, device=device, sqrtm=sqrtm)
    result["sampled_from"] = len(images.pixels)
    result["seconds"] = round(time.time() - t0, 2)
    result["notes"] = images.notes + notes + score_notes(result)
    return result


def submission_features(images: Images, model, device, batch_size: int = 100, progress: bool = False,
                        sample: int = 0, network_digest: str | None = None, desc: str = "score"):
    """(pool_3 features of the images, or of a seeded sample of them; notes on where they came
    from). The full set's features are read from the cache when an earlier score or report of the
    same images kept them, and kept there when computed."""
    n = len(images.pixels)
    rows = sample_rows(n, sample) if 0 < sample < n else None
    key = features_key(images.pixels, images.names, network_digest) if network_digest else None
    cached = load_features(key, n) if key else None
    notes = [] if rows is None else [f"a seeded sample of {len(rows):,} of the {n:,} images is scored (--sample): "
                                     "a quick first number, not comparable with a score of all of them"]
    if cached is not None:
        return (cached if rows is None else cached[rows]), notes + ["features of these images read from the "
                                                                    "cache (an earlier score or report)"]
    pixels = images.pixels if rows is None else images.pixels[rows]
    gen = feat.extract(model, pixels, device, batch_size=batch_size, progress=progress, desc=desc)
    if key and rows is None:
        save_features(key, gen)
    return gen, notes


def score_notes(result: dict) -> list[str]:
    """What a number needs said beside it: too few images for a stable FID, memorised images."""
    notes = []
    if result["n_images"] < FEATURE_DIM:
        notes.append(f"{result['n_images']} images: fewer than the {FEATURE_DIM} feature dimensions, so their "
                     "covariance is singular and the FID is not comparable with a 10,000-image score "
                     "(a quick check only)")
    if result["distance"] < MEMORIZATION_THRESHOLD:
        notes.append(f"d = {result['distance']:.4f} < {MEMORIZATION_THRESHOLD}: these images sit on the reference "
                     "photos (near-copies; the reference's own photos give d = 0), so MiFID divides the FID by d, the "
                     "competition's penalty for memorised images")
    return notes
