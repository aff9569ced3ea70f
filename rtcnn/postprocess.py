"""From the network's detections to one list of sources: threshold, NMS, stitching (numpy/scipy).

The stage after :mod:`rtcnn.inference` (network runs) and before :mod:`rtcnn.measure`:

* :class:`Sources` — detected sources (positions, score, dmag, sign), the record every
  later stage passes on.
* :func:`best_per_candidate` — stamps mode: one detection per candidate, its stamp's best
  peak within the acceptance radius of the candidate pixel.
* :func:`drop_masked` — no detection on a bad pixel.
* :func:`nms` and :func:`finalize` — the score threshold, then greedy non-maximum
  suppression, so one source yields one detection even where two stamps or tiles see it.

The network's own peaks are the 3x3 cell maxima of its heat map
(:func:`rtcnn.models.detector.decode`, also used by the training metrics); the peaks of
classical maps are :func:`rtcnn.difference.find_peaks`. The default score threshold is
:data:`rtcnn.models.detector.DEFAULT_THRESHOLD`. Positions follow the package convention
(:mod:`rtcnn`): 0-based, integer = pixel centre, arrays ``[y, x]``, positions ``(x, y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from rtcnn.errors import RtcnnInputError

__all__ = [
    "ACCEPT_RADIUS",
    "MERGE_RADIUS",
    "Sources",
    "best_per_candidate",
    "drop_masked",
    "finalize",
    "nms",
]

ACCEPT_RADIUS = 3.0  # px, a stamp's detection counts only this close to its candidate
MERGE_RADIUS = 2.0  # px, NMS radius of the final merge (one source, one detection)


@dataclass(frozen=True)
class Sources:
    """Detected sources, one entry per source.

    Attributes
    ----------
    x, y : (N,) float64
        Positions in px, 0-based, integer = pixel centre.
    score : (N,) float64
        Detection score.
    dmag : (N,) float64
        Magnitude difference (mag); NaN where unknown.
    brightened : (N,) bool
        True where the source brightened from the reference to the new image.
    """

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray
    dmag: np.ndarray
    brightened: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index) -> Sources:
        """The sources at ``index`` (a bool mask or integer indices), in that order."""
        return Sources(x=self.x[index], y=self.y[index], score=self.score[index],
                       dmag=self.dmag[index], brightened=self.brightened[index])  # fmt: skip

    def replace(self, **fields) -> Sources:
        """A copy with some fields replaced (e.g. refined ``x``, ``y`` or a measured ``dmag``)."""
        return Sources(**{**{k: getattr(self, k) for k in FIELDS}, **fields})

    @classmethod
    def from_detections(cls, det, index=None) -> Sources:
        """From the network's detections (:mod:`rtcnn.inference`: ``xy``, ``score``,
        ``dmag``, ``brightened`` arrays), optionally only those at ``index``."""
        index = slice(None) if index is None else index
        return cls(x=det["xy"][index, 0], y=det["xy"][index, 1], score=det["score"][index],
                   dmag=det["dmag"][index], brightened=det["brightened"][index])  # fmt: skip

    @classmethod
    def concatenate(cls, parts) -> Sources:
        """One :class:`Sources` from several (empty when ``parts`` is)."""
        parts = list(parts)
        if not parts:
            return cls(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, bool))
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in FIELDS})


FIELDS = ("x", "y", "score", "dmag", "brightened")


# --------------------------------------------------------------------------- selection
def best_per_candidate(batch: np.ndarray, xy: np.ndarray, score: np.ndarray,
                       cand_xy: np.ndarray, accept_radius: float = ACCEPT_RADIUS) -> np.ndarray:
    """Stamps mode: for each candidate, its stamp's best detection near the candidate pixel.

    Parameters
    ----------
    batch : (M,) int
        The candidate (stamp) of each detection.
    xy : (M, 2) float
        Detection positions in image px.
    score : (M,) float
    cand_xy : (K, 2) int or float
        Candidate pixels ``(x, y)``, indexed by ``batch``.
    accept_radius : float
        px; detections further from their candidate are dropped.

    Returns
    -------
    keep : (<= K,) int64
        Indices of the kept detections, by candidate.
    """
    batch = np.asarray(batch, np.int64)
    cand_xy = np.asarray(cand_xy)
    near = np.hypot(xy[:, 0] - cand_xy[batch, 0], xy[:, 1] - cand_xy[batch, 1]) <= accept_radius
    order = np.lexsort((-score, batch))
    keep = order[near[order]]
    if len(keep):
        keep = keep[np.r_[True, batch[keep][1:] != batch[keep][:-1]]]
    return keep.astype(np.int64)


def drop_masked(sources: Sources, mask: np.ndarray | None) -> Sources:
    """``sources`` without those whose nearest pixel is bad (``mask`` True)."""
    if mask is None or not len(sources):
        return sources
    ny, nx = mask.shape
    ix = np.clip(np.rint(sources.x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.rint(sources.y).astype(np.int64), 0, ny - 1)
    return sources.take(~mask[iy, ix])


def nms(x: np.ndarray, y: np.ndarray, score: np.ndarray, radius: float = MERGE_RADIUS) -> np.ndarray:
    """Greedy non-maximum suppression within a radius.

    Sources are visited by decreasing score; each kept source suppresses every
    lower-scored source closer than or at ``radius`` px.

    Parameters
    ----------
    x, y : (N,) float
        Positions in px.
    score : (N,) float
        Scores (higher = better).
    radius : float
        Suppression radius in px (0 keeps everything).

    Returns
    -------
    keep : (M,) int64
        Indices into the inputs of the kept sources, by decreasing score.
    """
    x, y, score = (np.asarray(a, dtype=np.float64).ravel() for a in (x, y, score))
    if not (len(x) == len(y) == len(score)):
        raise RtcnnInputError(None, f"x, y, score lengths differ: {len(x)}, {len(y)}, {len(score)}")
    if radius < 0:
        raise RtcnnInputError(None, f"NMS radius must be >= 0 px, got {radius}")
    order = np.argsort(-score, kind="stable")
    if len(x) == 0 or radius == 0:
        return order.astype(np.int64)
    pts = np.stack([x, y], axis=1)
    pairs = cKDTree(pts).query_pairs(r=radius, output_type="ndarray")
    if len(pairs) == 0:
        return order.astype(np.int64)
    rank = np.empty(len(x), dtype=np.int64)
    rank[order] = np.arange(len(x))
    # neighbours of each point that rank below it (would be suppressed by it)
    a, b = pairs[:, 0], pairs[:, 1]
    hi = np.where(rank[a] < rank[b], a, b)
    lo = np.where(rank[a] < rank[b], b, a)
    srt = np.argsort(hi, kind="stable")
    hi, lo = hi[srt], lo[srt]
    starts = np.searchsorted(hi, np.arange(len(x)))
    ends = np.searchsorted(hi, np.arange(len(x)), side="right")
    suppressed = np.zeros(len(x), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[lo[starts[i] : ends[i]]] = True
    return np.asarray(keep, dtype=np.int64)


def finalize(sources: Sources, threshold: float, merge_radius: float = MERGE_RADIUS) -> Sources:
    """The score threshold, then NMS: the final sources by decreasing score, ``dmag >= 0``."""
    s = Sources(x=np.asarray(sources.x, np.float64), y=np.asarray(sources.y, np.float64),
                score=np.asarray(sources.score, np.float64),
                dmag=np.asarray(sources.dmag, np.float64),
                brightened=np.asarray(sources.brightened, bool))  # fmt: skip
    s = s.take(s.score >= threshold)
    keep = nms(s.x, s.y, s.score, merge_radius)
    s = s.take(keep)
    return s.replace(dmag=np.abs(s.dmag))
