"""`dogkit score`: rules -> decode -> pool_3 features -> FID, memorization distance, MiFID."""
from __future__ import annotations

import time
from pathlib import Path

from dogkit.metrics import features as feat
from dogkit.metrics.features import FEATURE_DIM
from dogkit.metrics.fid import MEMORIZATION_THRESHOLD, score_features
from dogkit.metrics.reference import Reference
from dogkit.metrics.submission import Images, load_submission


def score(source: str | Path | Images, reference: Reference, model, device, strict: bool = True,
          batch_size: int = 100, progress: bool = False, sqrtm: str = "auto") -> dict:
    """MiFID of a submission (path, or images already checked by load_submission) against a
    reference; the result keys are fid.RESULT_KEYS plus seconds and notes. The distance matrix
    and (sqrtm "auto") the FID's matrix square root run on `device` when it is a GPU."""
    t0 = time.time()
    images = source if isinstance(source, Images) else load_submission(source, strict=strict)
    gen = feat.extract(model, images.pixels, device, batch_size=batch_size, progress=progress,
                       desc="score")
    result = score_features(gen, reference.mu, reference.sigma, reference.features, device=device, sqrtm=sqrtm)
    result["seconds"] = round(time.time() - t0, 2)
    result["notes"] = images.notes + score_notes(result)
    return result


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
