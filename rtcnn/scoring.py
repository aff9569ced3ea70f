"""Scoring library: match candidate catalogs to the truth; completeness, m50, false
positives per SCA, the false-positive budget sweep and the noise-limit oracle.

The command line is :mod:`rtcnn.score`.

Definitions
-----------
* **Matching**: per pair, detections and *all* truth rows (transients and variables)
  within ``radius`` px are paired one-to-one minimising the summed distance (Hungarian,
  :func:`scipy.optimize.linear_sum_assignment`, per connected group of candidates).
* **Completeness** is over truth rows of kind ``transient`` (every row when the truth has
  no ``kind``), whatever their S/N, binned in the *truth magnitude of the change*
  ``m = -2.5 log10 |F_new - F_ref|`` (AB; for a transient absent from the reference that
  is its magnitude in the new image); "completeness at S/N >= 5" uses the truth ``snr``.
* **m50**: the magnitude where completeness is 50 %, from a maximum-likelihood fit of
  ``C(m) = c / (1 + exp((m - m0) / w))`` to every transient (detected or not):
  ``m50 = m0 + w ln(2c - 1)`` (NaN when the curve never reaches 50 %). The binned curve's
  first 50 % crossing is reported too (``m50_binned``).
* **False positive**: a detection matched to no truth row (a detection on a variable,
  however faint, is not a false positive). **FP per SCA** = false positives x 4088^2 /
  scored area (sum of the pairs' image areas, from the catalog's ``image_shape``
  metadata, else the pair's FITS header, else ``--shape``). **Purity** = 1 - FP / detections.
* **Localisation**: median distance (px) of matched transients and the fraction within
  0.5 px. **dmag error**: median ``|dmag_cat - dmag_true|`` (mag) over matched transients
  and variables with both finite. ``dmag_true`` is, by default, the data layer's
  definition (:func:`photometric_dmag`: paper eq. 1-2, truth magnitudes plus aperture
  photometry of the pair's images, lower limits excluded); with ``--dmag-truth catalog``
  or without images, the truth's ``dmag`` column, else ``|mag_ref - mag_new|``.
* **Budget**: the catalog's score threshold is swept (detections with ``score >= t``,
  ``t`` over the catalog's scores); the deepest m50 among the lowest thresholds with FP
  per SCA <= budget (m50 only falls as ``t`` rises) is reported with its threshold. A
  catalog can only be swept above the threshold it was written with: write catalogs with
  a low threshold for this. One matching serves every threshold (:func:`match_levels`),
  and the m50 fit sums the likelihood over 0.01 mag steps, so the cost is linear in the
  rows (about 2 s for 1e5 truth rows on one loaded core; reading the ECSV files costs more).
* **Bad rows**: candidate or truth rows without a finite position and repeated truth rows
  are left out with a warning naming the count; non-numeric columns are an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table
from scipy.optimize import linear_sum_assignment, minimize
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from rtcnn.catalog import atomic_write, read_catalog
from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import NEW_NAME, REF_NAME
from rtcnn.roman import SCA_AREA

log = logging.getLogger(__name__)

MATCH_RADIUS = 2.0  # px, a detection within this distance of a truth row can match it
FP_BUDGET = 10.0  # false positives per full SCA at the alert operating point
SNR_MIN = 5.0  # truth S/N above which "completeness at S/N >= 5" counts a transient
ORACLE_SNR = (4.0, 4.5, 5.0, 5.5, 6.0)  # true S/N cuts of the noise-limit oracle rows
MAG_BIN = 0.5  # mag, width of the completeness bins
WITHIN_PX = 0.5  # px, "within 1/2 px" localisation fraction
SWEEP_POINTS = 200  # most thresholds tried in the sweep (quantiles of the scores)
SWEEP_FITS = 5  # m50 is fitted at this many of the lowest thresholds within the budget
M50_MIN_OBJECTS = 10  # fewer transients than this give m50 = NaN
EDGE_NEIGHBOURS = 4  # truth rows asked per detection at once (more are then asked one by one)
M50_MAG_STEP = 0.01  # mag, magnitudes are rounded to this for the m50 fit (linear cost)
M50_BOUNDS = ((-50.0, 50.0), (None, None), (-20.0, 20.0))  # logit c, m0 (mag), log w
M50_STARTS = ((3.0, 0.3), (1.0, 1.0), (3.0, 0.1))  # (logit c, w mag) starts of the m50 fit


# --------------------------------------------------------------------------- truth
def _masked_float(table: Table, name: str) -> np.ndarray:
    if name not in table.colnames:
        return np.full(len(table), np.nan)
    return np.asarray(np.ma.filled(np.ma.asarray(table[name], dtype=np.float64), np.nan))


def change_magnitude(mag_ref: np.ndarray, mag_new: np.ndarray) -> np.ndarray:
    """AB magnitude of the flux change ``|F_new - F_ref|``; NaN magnitudes = absent (flux 0).

    Parameters
    ----------
    mag_ref, mag_new : (M,) float
        Truth magnitudes, NaN where the object is absent from that image.

    Returns
    -------
    (M,) float64
        ``-2.5 log10 |10^(-0.4 m_new) - 10^(-0.4 m_ref)|`` (the zero point cancels);
        NaN when both are absent or the fluxes are equal.
    """
    f_ref = np.where(np.isfinite(mag_ref), 10.0 ** (-0.4 * np.nan_to_num(mag_ref)), 0.0)
    f_new = np.where(np.isfinite(mag_new), 10.0 ** (-0.4 * np.nan_to_num(mag_new)), 0.0)
    df = np.abs(f_new - f_ref)
    with np.errstate(divide="ignore"):
        return np.where(df > 0, -2.5 * np.log10(np.where(df > 0, df, 1.0)), np.nan)


def photometric_dmag(truth: Table, ref_path, new_path, truth_path=None) -> np.ndarray | None:
    """Truth dmag as the data layer defines it, for every truth row.

    :func:`rtcnn.truth.truth_dmag` on the pair's images: the truth measurement the
    training index uses (paper eq. 1-2 with the truth magnitudes and aperture photometry
    at the true positions, aperture-corrected with the Roman PSF; zero points from the
    headers, else eq. 3 from stars), NaN where it is a lower limit (a hostless transient
    measured against the empty reference: a limit is not a value to compare).

    Returns
    -------
    (M,) float64 or None
        None when no zero point can be had and one is needed, or the truth is empty.
    """
    from rtcnn.align import read_aligned_pair
    from rtcnn.truth import truth_dmag

    ref, new, _ = read_aligned_pair(ref_path, new_path)  # reference on the new grid
    return truth_dmag(truth, ref, new, truth_path)


def truth_columns(truth: Table, dmag: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The truth values the score needs, as plain arrays of length M.

    ``dmag`` overrides the truth's own dmag (e.g. :func:`photometric_dmag`).

    Returns
    -------
    dict
        ``x``, ``y`` (px), ``transient`` (bool), ``mag`` (change magnitude, AB),
        ``snr`` (NaN if absent), ``dmag`` (mag, NaN where unknown), ``brightened`` (bool).
    """
    mag_ref = _masked_float(truth, "mag_ref")
    mag_new = _masked_float(truth, "mag_new")
    if "kind" in truth.colnames:
        transient = np.asarray(truth["kind"]).astype(str) == "transient"
    else:
        transient = np.ones(len(truth), dtype=bool)
    if dmag is not None:
        dmag = np.asarray(dmag, dtype=np.float64)
    elif "dmag" in truth.colnames:
        dmag = _masked_float(truth, "dmag")
    else:
        dmag = np.abs(mag_ref - mag_new)  # NaN unless both magnitudes exist
    f_ref = np.where(np.isfinite(mag_ref), 10.0 ** (-0.4 * np.nan_to_num(mag_ref)), 0.0)
    f_new = np.where(np.isfinite(mag_new), 10.0 ** (-0.4 * np.nan_to_num(mag_new)), 0.0)
    return {
        "x": _masked_float(truth, "x"), "y": _masked_float(truth, "y"),
        "transient": transient, "mag": change_magnitude(mag_ref, mag_new),
        "snr": _masked_float(truth, "snr"), "dmag": dmag, "brightened": f_new > f_ref,
    }  # fmt: skip


# --------------------------------------------------------------------------- matching
def match(
    det_xy: np.ndarray, truth_xy: np.ndarray, radius: float = MATCH_RADIUS
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching within ``radius`` minimising the summed distance (Hungarian).

    Parameters
    ----------
    det_xy : (N, 2) float
        Detected positions (x, y) in px.
    truth_xy : (M, 2) float
        True positions in px (NaN rows never match).
    radius : float
        Largest matching distance in px (inclusive).

    Returns
    -------
    det_idx, truth_idx : (K,) int64
        Matched pairs, ``det_xy[det_idx[k]]`` ↔ ``truth_xy[truth_idx[k]]``.
    """
    det_xy = np.asarray(det_xy, dtype=np.float64).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    d, t, _, _, level = match_levels(det_xy, truth_xy, np.zeros(len(det_xy)), radius)
    return d[level == 0], t[level == 0]


def candidate_edges(
    det_xy: np.ndarray, truth_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (detection, truth row, distance) pairs closer than or at ``radius`` px."""
    good = np.flatnonzero(np.all(np.isfinite(truth_xy), axis=1))
    if not (len(det_xy) and len(good)):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    tree = cKDTree(truth_xy[good])
    k = min(EDGE_NEIGHBOURS, len(good))
    dist, j = tree.query(det_xy, k=k, distance_upper_bound=radius)
    dist, j = dist.reshape(len(det_xy), k), j.reshape(len(det_xy), k)
    di, col = np.nonzero(np.isfinite(dist))
    ti, dist = j[di, col], dist[di, col]
    crowded = di[col == k - 1]  # k neighbours within the radius: maybe more, ask again
    if k == EDGE_NEIGHBOURS and crowded.size:
        lists = tree.query_ball_point(det_xy[crowded], r=radius)
        keep = ~np.isin(di, crowded)
        extra_d = np.repeat(crowded, [len(e) for e in lists])
        extra_t = np.concatenate([np.asarray(e, np.int64) for e in lists])
        di, ti = np.concatenate([di[keep], extra_d]), np.concatenate([ti[keep], extra_t])
        dist = np.hypot(*(det_xy[di] - truth_xy[good][ti]).T)
    order = np.lexsort((ti, di))  # detection-major
    di, ti, dist = di[order].astype(np.int64), good[ti[order]].astype(np.int64), dist[order]
    return di, ti, dist


def match_levels(det_xy: np.ndarray, truth_xy: np.ndarray, score: np.ndarray, radius: float):
    """The one-to-one matching at every score threshold at once.

    At a threshold ``t`` the detections with ``score >= t`` and the truth rows are matched
    as :func:`match` does. An isolated pair (one detection, one truth row, no other
    candidate edge: the common case) is matched while its detection is kept; a group of
    candidates linked by edges is matched by the Hungarian algorithm once per distinct
    set of its detections that a threshold can keep (drop the lowest score, then the
    next...), so a sweep over any number of thresholds costs one matching.

    Parameters
    ----------
    det_xy : (N, 2) float
        Detected positions in px.
    truth_xy : (M, 2) float
        True positions in px (NaN rows never match).
    score : (N,) float
        Detection scores; NaN is kept only with no threshold.
    radius : float
        Largest matching distance in px.

    Returns
    -------
    det, truth : (K,) int64
        Matched pairs.
    lo, hi : (K,) float64
        The pair is matched at thresholds ``lo < t <= hi``.
    level : (K,) int64
        0 for the matching of every detection (no threshold).
    """
    det_xy = np.asarray(det_xy, dtype=np.float64).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    s = np.where(np.isnan(score), -np.inf, np.asarray(score, dtype=np.float64))
    di, ti, dist = candidate_edges(det_xy, truth_xy, radius)
    n_det, n = len(det_xy), len(det_xy) + len(truth_xy)
    graph = coo_matrix((np.ones(len(di)), (di, n_det + ti)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    comp = label[di]
    n_edges = np.bincount(comp, minlength=n)[comp] if di.size else np.zeros(0, np.int64)
    one = n_edges == 1
    out = [(di[one], ti[one], np.full(one.sum(), -np.inf), s[di[one]],
            np.zeros(one.sum(), np.int64))]
    order = np.flatnonzero(~one)[np.argsort(comp[~one], kind="stable")]
    groups = np.split(order, np.flatnonzero(np.diff(comp[order])) + 1) if order.size else []
    for g in groups:
        levels = np.sort(np.unique(s[di[g]]))
        kept_from = -np.inf
        for j, lowest in enumerate(levels):  # level j keeps the detections scoring >= lowest
            keep = g[s[di[g]] >= lowest]
            d, t = _hungarian(di[keep], ti[keep], dist[keep])
            out.append((d, t, np.full(len(d), kept_from), np.full(len(d), lowest),
                        np.full(len(d), j, np.int64)))
            kept_from = lowest
    cols = [np.concatenate(c) for c in zip(*out)]
    return (cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.float64),
            cols[3].astype(np.float64), cols[4])


def _hungarian(di, ti, dist) -> tuple[np.ndarray, np.ndarray]:
    """Most matches, then the smallest summed distance, among candidate edges."""
    if (di == di[0]).all() or (ti == ti[0]).all():  # a star: one match, the closest edge
        best = np.argmin(dist)
        return di[best:best + 1], ti[best:best + 1]
    ud, d_inv = np.unique(di, return_inverse=True)
    ut, t_inv = np.unique(ti, return_inverse=True)
    big = 1e6 + dist.max()  # "no edge": never preferred to a real edge
    cost = np.full((len(ud), len(ut)), big)
    cost[d_inv, t_inv] = dist
    r, c = linear_sum_assignment(cost)
    real = cost[r, c] < big
    return ud[r[real]], ut[c[real]]


# --------------------------------------------------------------------------- curves
def completeness_curve(
    mag: np.ndarray, detected: np.ndarray, bins: np.ndarray
) -> dict[str, np.ndarray]:
    """Completeness per magnitude bin.

    Returns
    -------
    dict of (B,) arrays
        ``lo``, ``hi`` (bin edges, mag), ``n`` (transients), ``n_det`` (detected),
        ``completeness`` (NaN for empty bins).
    """
    mag = np.asarray(mag, dtype=np.float64)
    ok = np.isfinite(mag)
    n, _ = np.histogram(mag[ok], bins)
    k, _ = np.histogram(mag[ok & detected], bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        comp = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    return {"lo": bins[:-1], "hi": bins[1:], "n": n, "n_det": k, "completeness": comp}


def fit_m50(mag: np.ndarray, detected: np.ndarray) -> dict[str, float]:
    """Maximum-likelihood logistic completeness curve and its 50 % magnitude.

    ``C(m) = c / (1 + exp((m - m0) / w))`` fitted to Bernoulli outcomes (every object,
    no binning), ``0 < c <= 1``, ``w > 0``. Linear in the number of objects: magnitudes
    are rounded to :data:`M50_MAG_STEP` (0.01 mag, below any magnitude error here) and
    the likelihood is summed as binomial counts per rounded magnitude, then minimised
    with L-BFGS-B and its analytic gradient from a few starts.

    Parameters
    ----------
    mag : (M,) float
        Truth magnitudes (AB); non-finite entries are ignored.
    detected : (M,) bool

    Returns
    -------
    dict
        ``m50`` (mag; NaN when ``c <= 0.5``, too few objects, or nothing detected),
        ``c_max``, ``m0``, ``width`` (mag).
    """
    mag = np.asarray(mag, dtype=np.float64)
    det = np.asarray(detected, dtype=bool)
    ok = np.isfinite(mag)
    mag, det = mag[ok], det[ok]
    nan = {"m50": math.nan, "c_max": math.nan, "m0": math.nan, "width": math.nan}
    if len(mag) < M50_MIN_OBJECTS or not det.any():
        return nan
    if det.all():  # never falls: the curve's 50 % point lies beyond the faintest object
        return {**nan, "c_max": 1.0}
    q = np.round(mag / M50_MAG_STEP).astype(np.int64)
    q -= q.min()
    n, k = np.bincount(q).astype(np.float64), np.bincount(q, weights=det)
    used = n > 0
    m = (np.flatnonzero(used) + np.round(mag.min() / M50_MAG_STEP)) * M50_MAG_STEP
    n, k = n[used], k[used]
    m0_start = float(np.median(mag[det])) if det.sum() > 1 else float(np.median(mag))
    best = None
    for c0, w0 in M50_STARTS:
        res = minimize(_logistic_nll, [c0, m0_start, math.log(w0)], args=(m, n, k), jac=True,
                       method="L-BFGS-B", bounds=M50_BOUNDS)  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    c = 1.0 / (1.0 + math.exp(-best.x[0]))
    m0, w = float(best.x[1]), math.exp(best.x[2])
    m50 = m0 + w * math.log(2.0 * c - 1.0) if c > 0.5 else math.nan
    return {"m50": float(m50), "c_max": float(c), "m0": m0, "width": float(w)}


def _logistic_nll(p, m, n, k) -> tuple[float, np.ndarray]:
    """Binomial negative log-likelihood of ``C(m) = c / (1 + exp((m - m0) / w))`` and its
    gradient, with ``p = (logit c, m0, log w)``, ``k`` of ``n`` detected at ``m``."""
    a, m0, lw = p
    w = math.exp(lw)
    z = (m - m0) / w
    log_c, log_1mc = -np.logaddexp(0.0, -a), -np.logaddexp(0.0, a)
    sp = np.logaddexp(0.0, z)  # log(1 + e^z)
    l1 = np.logaddexp(log_1mc, z)  # log(1 - c + e^z)
    ll = k * (log_c - sp) + (n - k) * (l1 - sp)  # log C^k (1 - C)^(n - k)
    c = math.exp(log_c)
    q = np.exp(log_1mc - l1)  # (1 - c) / (1 - c + e^z)
    sig = np.exp(z - sp)  # e^z / (1 + e^z)
    d_a = k * (1.0 - c) - (n - k) * q * c
    d_z = -k * sig + (n - k) * (1.0 - q - sig)
    grad = -np.array([d_a.sum(), -(d_z.sum()) / w, -(d_z * z).sum()])
    return float(-ll.sum()), grad


def m50_binned(curve: dict[str, np.ndarray]) -> float:
    """First 50 % crossing of a binned curve from the bright end (linear between centres)."""
    centre = 0.5 * (curve["lo"] + curve["hi"])
    comp = curve["completeness"]
    ok = np.isfinite(comp)
    centre, comp = centre[ok], comp[ok]
    for i in range(1, len(comp)):
        if comp[i - 1] >= 0.5 > comp[i]:
            t = (comp[i - 1] - 0.5) / (comp[i - 1] - comp[i])
            return float(centre[i - 1] + t * (centre[i] - centre[i - 1]))
    return math.nan


# --------------------------------------------------------------------------- one pair
@dataclass
class PairScore:
    """A catalog and the truth of one pair, matched at any score threshold."""

    name: str
    area: float  # px^2, image area
    truth: dict[str, np.ndarray]
    det_xy: np.ndarray  # (N, 2) px
    score: np.ndarray  # (N,)
    dmag: np.ndarray  # (N,) mag
    brightened: np.ndarray  # (N,) bool
    _levels: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        txy = np.column_stack([self.truth["x"], self.truth["y"]])
        self._truth_xy = txy

    def levels(self, radius: float):
        """:func:`match_levels` of this pair (computed once per radius)."""
        if radius not in self._levels:
            self._levels[radius] = match_levels(self.det_xy, self._truth_xy, self.score, radius)
        return self._levels[radius]

    def matched(self, radius: float, threshold: float | None = None):
        """Matched (det_idx, truth_idx) among detections with ``score >= threshold``."""
        d, t, lo, hi, level = self.levels(radius)
        on = (level == 0) if threshold is None else (lo < threshold) & (threshold <= hi)
        return d[on], t[on]


def pair_score(
    name: str, catalog: Table, truth: Table, area: float, truth_dmag: np.ndarray | None = None,
    catalog_path=None, truth_path=None,
) -> PairScore:
    """Bundle one pair's catalog and truth for :func:`evaluate` (``truth_dmag``: see
    :func:`truth_columns`).

    Checked here, naming the file: non-numeric position / score / magnitude columns are an
    :class:`RtcnnInputError`; catalog rows without a finite position, truth rows without
    one (they could never be matched) and repeated truth rows (same position and
    magnitudes: they would count one transient twice) are left out with a warning that
    names the count.
    """
    for table, path, cols in ((catalog, catalog_path, ("x", "y", "score", "dmag")),
                              (truth, truth_path, ("x", "y", "mag_ref", "mag_new", "snr", "dmag"))):
        for col in cols:
            _check_numeric(table, col, path or name)
    det_xy = np.column_stack([_masked_float(catalog, "x"), _masked_float(catalog, "y")])
    good = np.all(np.isfinite(det_xy), axis=1)
    if not good.all():
        _warn(catalog_path or name, f"{int((~good).sum())} of {len(good)} candidate rows "
              "have no finite x/y (NaN or masked) and are ignored")
        catalog = catalog[good]
        det_xy = det_xy[good]
    truth, truth_dmag = _clean_truth(truth, truth_path or name, truth_dmag)
    return PairScore(
        name=name, area=float(area), truth=truth_columns(truth, truth_dmag),
        det_xy=det_xy, score=_masked_float(catalog, "score"),
        dmag=_masked_float(catalog, "dmag"),
        brightened=np.asarray(np.ma.filled(np.ma.asarray(catalog["brightened"]), True),
                              dtype=bool),
    )  # fmt: skip


def _check_numeric(table: Table, col: str, path) -> None:
    if col in table.colnames and table[col].dtype.kind not in "fiub":
        raise RtcnnInputError(path, f"column {col!r} is not numeric ({table[col].dtype}; "
                              f"first value {table[col][0]!r})" if len(table) else
                              f"column {col!r} is not numeric ({table[col].dtype})")


def _clean_truth(truth: Table, path, truth_dmag):
    """``(truth, truth_dmag)`` without rows that have no finite position and without
    repeated rows (same x, y, mag_ref, mag_new), each left out with a warning."""
    xy = np.column_stack([_masked_float(truth, "x"), _masked_float(truth, "y")])
    keep = np.all(np.isfinite(xy), axis=1)
    if not keep.all():
        _warn(path, f"{int((~keep).sum())} of {len(keep)} truth rows have no finite x/y "
              "(NaN or masked) and are ignored")
    key = np.column_stack([xy, _masked_float(truth, "mag_ref"), _masked_float(truth, "mag_new")])
    key = np.where(np.isfinite(key), key, np.inf)  # NaN == NaN for the duplicate test
    order = np.argsort(key[:, 0], kind="stable")  # equal rows are neighbours in x, then...
    same_x = np.flatnonzero(np.diff(key[order, 0]) == 0)
    unique = np.ones(len(truth), dtype=bool)
    if same_x.size:  # ...the few rows sharing an x are compared in full
        rows = np.unique(np.concatenate([same_x, same_x + 1]))
        sub = order[rows]
        _, first = np.unique(key[sub], axis=0, return_index=True)
        unique[sub] = False
        unique[sub[first]] = True
    n_dup = int((keep & ~unique).sum())
    if n_dup:
        _warn(path, f"{n_dup} truth rows repeat another row (same x, y, mag_ref, mag_new) "
              "and are ignored")
    keep &= unique
    if keep.all():
        return truth, truth_dmag
    return truth[keep], None if truth_dmag is None else np.asarray(truth_dmag)[keep]


def _warn(path, message: str) -> None:
    warnings.warn(f"{path}: {message}", ScoreInputWarning, stacklevel=3)


class ScoreInputWarning(UserWarning):
    """Rows of a catalog or truth table left out of the score (the message names them)."""


# --------------------------------------------------------------------------- metrics
def _collect(pairs: list[PairScore], radius: float, threshold: float | None):
    """Per-transient detection flags and per-detection outcomes over all pairs."""
    out = {k: [] for k in ("mag", "snr", "det", "n_fp", "n_det", "dist", "dmag_err", "sign")}
    for p in pairs:
        di, ti = p.matched(radius, threshold)
        sel = np.ones(len(p.score), bool) if threshold is None else p.score >= threshold
        t = p.truth
        hit = np.zeros(len(t["x"]), dtype=bool)
        hit[ti] = True
        tr = t["transient"]
        out["mag"].append(t["mag"][tr])
        out["snr"].append(t["snr"][tr])
        out["det"].append(hit[tr])
        out["n_det"].append(int(sel.sum()))
        out["n_fp"].append(int(sel.sum()) - len(di))
        on_tr = tr[ti]
        out["dist"].append(np.hypot(*(p.det_xy[di[on_tr]] - p._truth_xy[ti[on_tr]]).T)
                           if on_tr.any() else np.zeros(0))  # fmt: skip
        out["dmag_err"].append(np.abs(p.dmag[di] - t["dmag"][ti]))
        out["sign"].append(p.brightened[di] == t["brightened"][ti])
    cat = {k: (np.concatenate(v) if k not in ("n_fp", "n_det") else np.asarray(v))
           for k, v in out.items()}  # fmt: skip
    return cat


def _nan_stat(fn, values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(fn(values)) if values.size else math.nan


def evaluate(
    pairs: list[PairScore],
    radius: float = MATCH_RADIUS,
    threshold: float | None = None,
    bins: np.ndarray | None = None,
    snr_min: float = SNR_MIN,
) -> dict:
    """All metrics of one method over many pairs at one score threshold.

    Parameters
    ----------
    pairs : list of PairScore
    radius : float
        Matching radius, px.
    threshold : float, optional
        Keep detections with ``score >= threshold`` (None: all rows).
    bins : (B + 1,) float, optional
        Magnitude bin edges; default :data:`MAG_BIN` wide over the transients' range.
    snr_min : float
        Truth S/N for ``completeness_snr``.

    Returns
    -------
    dict
        ``n_pairs``, ``area_px``, ``n_transients``, ``n_detections``, ``n_matched``
        (transients found), ``n_false``, ``completeness``, ``completeness_snr`` (S/N >=
        ``snr_min``), ``n_snr``, ``m50``, ``m50_binned``, ``fit`` (logistic parameters),
        ``fp_per_sca``, ``purity``, ``loc_median_px``, ``loc_within_half_px``,
        ``dmag_median_abs_err``, ``n_dmag``, ``sign_accuracy``, ``curve`` (per bin).
    """
    c = _collect(pairs, radius, threshold)
    area = float(sum(p.area for p in pairs))
    mag, det, snr = c["mag"], c["det"], c["snr"]
    if bins is None:
        finite = mag[np.isfinite(mag)]
        lo = math.floor(finite.min() / MAG_BIN) * MAG_BIN if finite.size else 20.0
        hi = math.ceil(finite.max() / MAG_BIN) * MAG_BIN if finite.size else 28.0
        bins = np.arange(lo, hi + MAG_BIN / 2, MAG_BIN) if hi > lo else np.array([lo, lo + MAG_BIN])
    curve = completeness_curve(mag, det, np.asarray(bins, dtype=np.float64))
    fit = fit_m50(mag, det)
    n_det = int(c["n_det"].sum())
    n_fp = int(c["n_fp"].sum())
    strong = np.isfinite(snr) & (snr >= snr_min)
    dm = c["dmag_err"][np.isfinite(c["dmag_err"])]
    return {
        "threshold": None if threshold is None else float(threshold),
        "n_pairs": len(pairs),
        "area_px": area,
        "n_transients": int(len(det)),
        "n_detections": n_det,
        "n_matched": int(det.sum()),
        "n_false": n_fp,
        "completeness": float(det.mean()) if len(det) else math.nan,
        "completeness_snr": float(det[strong].mean()) if strong.any() else math.nan,
        "n_snr": int(strong.sum()),
        "m50": fit["m50"],
        "m50_binned": m50_binned(curve),
        "fit": fit,
        "fp_per_sca": n_fp * SCA_AREA / area if area > 0 else math.nan,
        "purity": 1.0 - n_fp / n_det if n_det else math.nan,
        "loc_median_px": _nan_stat(np.median, c["dist"]),
        "loc_within_half_px": float(np.mean(c["dist"] <= WITHIN_PX)) if len(c["dist"]) else math.nan,
        "dmag_median_abs_err": float(np.median(dm)) if dm.size else math.nan,
        "n_dmag": int(dm.size),
        "sign_accuracy": float(np.mean(c["sign"])) if len(c["sign"]) else math.nan,
        "curve": {k: np.asarray(v).tolist() for k, v in curve.items()},
    }  # fmt: skip


def oracle_m50(pairs: list[PairScore], snr_levels=ORACLE_SNR) -> dict[str, float]:
    """m50 of an oracle that reports exactly the transients with true ``|S/N| >= X``.

    The reference for "how close to the noise limit is a method": no detector can tell a
    transient of true S/N X from a noise peak of the same height, so at a false-positive
    budget that forces a cut near S/N X its m50 cannot beat the oracle's at X. Needs the
    truth's ``snr`` column (the simulator's difference-image PSF S/N).

    Returns
    -------
    dict
        ``"<X>"`` -> m50 (mag; NaN when the truth has no S/N or too few transients).
    """
    mag = np.concatenate([p.truth["mag"][p.truth["transient"]] for p in pairs])
    snr = np.abs(np.concatenate([p.truth["snr"][p.truth["transient"]] for p in pairs]))
    out = {}
    for level in snr_levels:
        out[f"{level:g}"] = (fit_m50(mag, snr >= level)["m50"] if np.isfinite(snr).any()
                             else math.nan)  # fmt: skip
    return out


def _in_intervals(lo: np.ndarray, hi: np.ndarray, t: np.ndarray) -> np.ndarray:
    """How many intervals ``lo < t <= hi`` (``lo < hi``) hold each ``t``, (T,) int64."""
    return (len(hi) - np.searchsorted(np.sort(hi), t, side="left")
            - (len(lo) - np.searchsorted(np.sort(lo), t, side="left")))


def sweep(
    pairs: list[PairScore],
    radius: float = MATCH_RADIUS,
    budget: float = FP_BUDGET,
    thresholds: np.ndarray | None = None,
    snr_min: float = SNR_MIN,
) -> dict:
    """Sweep the score threshold; the deepest m50 with FP per SCA within ``budget``.

    Returns
    -------
    dict
        ``budget``, ``threshold`` (NaN when no threshold meets the budget), ``m50``,
        ``fp_per_sca``, ``completeness``, ``completeness_snr`` at that threshold, and
        ``curve``: lists ``threshold``, ``fp_per_sca``, ``completeness``, ``m50``.
    """
    scores = np.concatenate([p.score for p in pairs]) if pairs else np.zeros(0)
    scores = scores[np.isfinite(scores)]
    if thresholds is None:
        uniq = np.unique(scores)
        if len(uniq) > SWEEP_POINTS:
            uniq = np.unique(np.quantile(uniq, np.linspace(0, 1, SWEEP_POINTS)))
        thresholds = uniq
    area = float(sum(p.area for p in pairs))
    thr = np.sort(np.asarray(thresholds, dtype=np.float64))
    n_det = np.zeros(len(thr), np.int64)
    n_match = np.zeros(len(thr), np.int64)
    n_found = np.zeros(len(thr), np.int64)
    n_tr = 0
    for p in pairs:
        d, t, lo, hi, level = p.levels(radius)
        sc = np.sort(p.score[np.isfinite(p.score)])
        n_det += len(sc) - np.searchsorted(sc, thr, side="left")  # score >= t
        for sel, acc in ((np.ones(len(t), bool), n_match), (p.truth["transient"][t], n_found)):
            acc += _in_intervals(lo[sel], hi[sel], thr)
        n_tr += int(p.truth["transient"].sum())
    fps = (n_det - n_match) * SCA_AREA / area
    comps = n_found / n_tr if n_tr else np.full(len(thr), math.nan)
    rows = [(float(t), float(fp), float(comp)) for t, fp, comp in zip(thr, fps, comps)]
    best = {"budget": float(budget), "threshold": math.nan, "m50": math.nan,
            "fp_per_sca": math.nan, "completeness": math.nan, "completeness_snr": math.nan}
    # m50 falls as the threshold rises, so the deepest m50 within the budget sits at the
    # lowest thresholds that meet it: fit the SWEEP_FITS lowest (FP is not strictly
    # monotonic in the threshold once the matching is redone, hence more than one).
    m50s = [math.nan] * len(rows)
    within = [i for i, r in enumerate(rows) if r[1] <= budget]
    for i in within[:SWEEP_FITS]:
        t, fp, comp = rows[i]
        c = _collect(pairs, radius, t)
        m50s[i] = m50 = fit_m50(c["mag"], c["det"])["m50"]
        if np.isfinite(m50) and not (m50 <= best["m50"]):
            strong = np.isfinite(c["snr"]) & (c["snr"] >= snr_min)
            best.update(threshold=t, m50=m50, fp_per_sca=fp, completeness=comp,
                        completeness_snr=float(c["det"][strong].mean()) if strong.any()
                        else math.nan)  # fmt: skip
    best["curve"] = {"threshold": [r[0] for r in rows], "fp_per_sca": [r[1] for r in rows],
                     "completeness": [r[2] for r in rows], "m50": m50s}  # fmt: skip
    return best


# --------------------------------------------------------------------------- inputs
def image_area(catalog: Table, truth_path: Path, shape: tuple[int, int] | None) -> float:
    """Image area (px^2) of a pair: catalog ``image_shape`` meta, FITS header, or ``shape``."""
    meta = catalog.meta.get("image_shape")
    if meta is not None and len(meta) == 2:
        return float(meta[0]) * float(meta[1])
    from astropy.io import fits

    for name in (NEW_NAME, REF_NAME):
        p = truth_path.parent / name
        if p.is_file():
            try:
                h = fits.getheader(p)
                return float(h["NAXIS1"]) * float(h["NAXIS2"])
            except Exception:  # unreadable header: try the next source
                pass
    if shape is not None:
        return float(shape[0]) * float(shape[1])
    raise RtcnnInputError(truth_path, "image area unknown (no image_shape in the catalog "
                          "metadata, no new.fits beside the truth); pass --shape NY NX")  # fmt: skip


def _read_truth(path: Path) -> Table:
    """The truth table; checked against the pair's image beside it when there is one.

    With ``new.fits`` (else ``ref.fits``) next to the truth, RA/Dec-only rows are placed
    through its WCS and a truth entirely off the image is an error (a wrong catalog).
    """
    from rtcnn.io import read_image, read_truth

    image = next((read_image(p) for p in (path.parent / NEW_NAME, path.parent / REF_NAME)
                  if p.is_file()), None)
    return read_truth(path, image=image)


def _truth_dmag(truth: Table, truth_path: Path, photometry: bool) -> np.ndarray | None:
    ref, new = truth_path.parent / REF_NAME, truth_path.parent / NEW_NAME
    if photometry and ref.is_file() and new.is_file():
        return photometric_dmag(truth, ref, new, truth_path)
    return None


def load_pairs(
    names: list[str],
    truth: list[str] | None,
    data: str | None,
    shape: tuple[int, int] | None = None,
    photometry: bool = True,
) -> dict[str, list[PairScore]]:
    """Read every catalog and truth named on the command line.

    With ``photometry`` and the pair's ``ref.fits``/``new.fits`` beside the truth, the
    truth dmag is :func:`photometric_dmag`; otherwise the truth's ``dmag`` column or
    ``|mag_ref - mag_new|``.

    Returns
    -------
    dict
        Catalog name → list of :class:`PairScore` (one per pair), in command-line order.
    """
    if truth is not None and data is not None:
        raise RtcnnInputError(None, "give either --truth TRUTH (one pair) or --data DIR (pairs)")
    out: dict[str, list[PairScore]] = {n: [] for n in names}
    if truth is None and data is None:  # positional CATALOG TRUTH pairs: one method
        if len(names) < 2 or len(names) % 2:
            raise RtcnnInputError(None, "give CATALOG TRUTH pairs, or catalogs with "
                                  "--truth TRUTH (one pair) or --data DIR (pairs)")  # fmt: skip
        out = {names[0]: []}
        for cname, tname in zip(names[0::2], names[1::2]):
            tpath = Path(tname)
            t = _read_truth(tpath)
            cat = read_catalog(cname)
            out[names[0]].append(pair_score(tpath.parent.name, cat, t,
                                            image_area(cat, tpath, shape),
                                            _truth_dmag(t, tpath, photometry), cname,
                                            tpath))  # fmt: skip
        return out
    if truth is not None:
        if len(truth) != 1:
            raise RtcnnInputError(None, "--truth takes one truth table; use --data for many pairs")
        tpath = Path(truth[0])
        t = _read_truth(tpath)
        td = _truth_dmag(t, tpath, photometry)
        for n in names:
            cat = read_catalog(n)
            area = image_area(cat, tpath, shape)
            out[n].append(pair_score(tpath.parent.name, cat, t, area, td, n, tpath))
        return out
    from rtcnn.io import find_pairs

    found = [p for p in find_pairs(data) if p.truth is not None]
    if not found:
        raise RtcnnInputError(data, "no pair directory with a truth table found")
    for pair in found:
        t = _read_truth(pair.truth)
        td = _truth_dmag(t, pair.truth, photometry)
        for n in names:
            path = Path(n.format(pair=pair.name)) if "{pair}" in n else pair.truth.parent / n
            cat = read_catalog(path)
            out[n].append(pair_score(pair.name, cat, t, image_area(cat, pair.truth, shape), td,
                                     path, pair.truth))
    return out


# --------------------------------------------------------------------------- report
def format_table(results: dict[str, dict]) -> str:
    """A fixed-width text table, one row per method."""
    head = ("method", "n_det", "compl", "compl_snr5", "m50", "FP/SCA", "purity", "loc_med",
            "<=0.5px", "dmag_err", "thr@budget", "m50@budget", "FP@budget")  # fmt: skip
    rows = [head]

    def f(v, fmt):
        return "nan" if v is None or not np.isfinite(v) else format(v, fmt)

    for label, r in results.items():
        a, b = r["at_threshold"], r["budget"]
        rows.append((label, str(a["n_detections"]), f(a["completeness"], ".3f"),
                     f(a["completeness_snr"], ".3f"), f(a["m50"], ".2f"),
                     f(a["fp_per_sca"], ".1f"), f(a["purity"], ".3f"),
                     f(a["loc_median_px"], ".3f"), f(a["loc_within_half_px"], ".3f"),
                     f(a["dmag_median_abs_err"], ".3f"), f(b["threshold"], ".3g"),
                     f(b["m50"], ".2f"), f(b["fp_per_sca"], ".1f")))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def write_json(obj: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON atomically (NaN → null), refusing to overwrite unless asked."""
    text = json.dumps(_json_safe(obj), indent=2) + "\n"

    def writer(tmp: str) -> None:
        Path(tmp).write_text(text)

    return atomic_write(Path(path), overwrite, writer)
