"""`dogkit score`: rules -> decode -> pool_3 features -> FID, memorization distance, MiFID."""
from __future__ import annotations

import time
from pathlib import Path

from dogkit.metrics import features as feat
from dogkit.metrics.fid import score_features
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
    result["notes"] = images.notes
    return result
