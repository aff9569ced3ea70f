"""Truth measurement: the changes a truth table lists, as measured in the pair's images.

One stage of the data flow (``io -> truth -> data.index / scoring``): it takes a pair
(reference and new :class:`rtcnn.io.Image` on one pixel grid) and its truth table and
returns, per change,

* the **footprint** check: rows off the image are dropped (logged), a table entirely
  off the image is an error (:func:`in_footprint`, :func:`truth_on_image`);
* **dmag** by paper eq. 1-3 (:func:`measure_changes`): eq. 1 ``|m_ref - m_new|`` from the
  truth magnitudes, eq. 2 by aperture photometry (aperture-corrected to total with the
  Roman PSF, :func:`rtcnn.photometry.image_aperture_correction`) on the side the truth
  lacks, NaN when both sides are below the detection limit;
* the **S/N** of the flux change in the difference image and the signed flux change;
* the **zero points** (:func:`pair_zeropoints`): the header's, else eq. 3 from the stars
  of the truth / a ``sources.ecsv`` / ``stars.ecsv`` beside it, else none when every change
  has both truth magnitudes (eq. 1 needs no zero point).

:mod:`rtcnn.data.index` (the training targets) and :mod:`rtcnn.scoring` (the truth dmag
of the score, :func:`truth_dmag`) both call it, so "dmag as the data layer defines it" is
this one measurement. The detections' own dmag is the same photometry without truth
magnitudes (:func:`rtcnn.photometry.aperture_dmag`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from astropy.table import Table

from rtcnn import photometry as phot
from rtcnn.errors import RtcnnInputError

log = logging.getLogger(__name__)

STAR_CATALOG_NAMES = ("sources.ecsv", "stars.ecsv")  # star catalogs looked for next to truth
#: Columns of :func:`truth_changes` and their dtypes.
CHANGE_COLUMNS = {
    "id": str, "x": np.float64, "y": np.float64, "mag_ref": np.float64,
    "mag_new": np.float64, "dmag": np.float64, "dmag_method": str, "snr": np.float64,
    "dflux": np.float64, "kind": str,
}


def in_footprint(x, y, shape: tuple[int, int]) -> np.ndarray:
    """True where ``(x, y)`` (0-based px) lies on an image of ``shape = (ny, nx)``:
    ``-0.5 <= x < nx - 0.5`` and the same in y (NaN is off)."""
    ny, nx = shape
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


def truth_on_image(truth: Table, shape: tuple[int, int], truth_path=None,
                   image_path=None) -> Table:
    """The rows of ``truth`` on the image (:func:`in_footprint`); the others are logged.

    Raises
    ------
    RtcnnInputError
        The table has rows but none on the image (a wrong catalog or WCS).
    """
    inside = in_footprint(truth["x"], truth["y"], shape)
    if len(truth) and not inside.any():
        ny, nx = shape
        raise RtcnnInputError(
            truth_path, f"all {len(truth)} catalog positions fall outside the image "
            f"({nx} x {ny} px, from {image_path}); wrong catalog or WCS?")
    if not inside.all():
        log.info("%s: %d of %d catalog positions fall outside the image and are ignored",
                 truth_path, int((~inside).sum()), len(truth))
        truth = truth[inside]
    return truth


def masked_to_nan(table: Table, col: str) -> np.ndarray:
    """A column as float64 with masked entries NaN; all NaN when the column is absent."""
    if col not in table.colnames:
        return np.full(len(table), np.nan)
    vals = np.ma.filled(np.ma.asarray(table[col], dtype=np.float64), np.nan)
    return np.asarray(vals, dtype=np.float64)


def truth_changes(ref, new, truth_path, kinds=None, r_ap: float = phot.DEFAULT_R_AP,
                  r_in: float = phot.DEFAULT_R_IN, r_out: float = phot.DEFAULT_R_OUT,
                  ref_path=None) -> tuple[dict, tuple]:
    """The changes of a pair's truth table, measured (the training targets).

    Parameters
    ----------
    ref, new : rtcnn.io.Image
        The pair, on one pixel grid.
    truth_path : path-like or None
        The truth table (None: no changes).
    kinds : sequence of str, optional
        Keep only rows of these ``kind`` values.
    r_ap, r_in, r_out : float
        Aperture and background-annulus radii, px.
    ref_path : path-like, optional
        Named in the footprint error (default ``ref.path``).

    Returns
    -------
    changes : dict of (M,) arrays
        :data:`CHANGE_COLUMNS`: ``snr`` / ``dflux`` are the truth's where it gives them,
        else measured (:func:`measure_changes`).
    zeropoints : (zp_ref, zp_new)
        The zero points used (None where unknown and not needed).
    """
    from rtcnn.io import read_truth

    header_zps = (ref.zeropoint, new.zeropoint)
    if truth_path is None:
        return empty_changes(), header_zps
    truth = read_truth(truth_path, image=ref)
    if kinds is not None and "kind" in truth.colnames:
        truth = truth[np.isin(np.asarray(truth["kind"]).astype(str), kinds)]
    if len(truth) == 0:
        return empty_changes(), header_zps
    truth = truth_on_image(truth, ref.shape, truth_path, ref_path or ref.path)
    x = np.asarray(truth["x"], dtype=np.float64)
    y = np.asarray(truth["y"], dtype=np.float64)
    mag_ref, mag_new = masked_to_nan(truth, "mag_ref"), masked_to_nan(truth, "mag_new")
    meas = measure_changes(ref, new, x, y, mag_ref, mag_new, truth_path, r_ap, r_in, r_out)
    snr, dflux = meas["snr"], meas["dflux"]
    for col, measured in (("snr", snr), ("dflux", dflux)):  # truth values win when given
        if col in truth.colnames:
            given = masked_to_nan(truth, col)
            measured[np.isfinite(given)] = given[np.isfinite(given)]
    ids = (np.asarray(truth["id"]).astype(str) if "id" in truth.colnames
           else np.arange(len(truth)).astype(str))
    kind = (np.asarray(truth["kind"]).astype(str) if "kind" in truth.colnames
            else np.full(len(truth), "transient"))
    out = {"id": ids, "x": x, "y": y, "mag_ref": mag_ref, "mag_new": mag_new,
           "dmag": meas["dmag"], "dmag_method": meas["method"],
           "snr": np.asarray(snr, dtype=np.float64), "dflux": dflux, "kind": kind}
    return ({k: np.asarray(v, dtype=CHANGE_COLUMNS[k]) for k, v in out.items()},
            meas["zeropoint"])


def empty_changes() -> dict:
    """:data:`CHANGE_COLUMNS` with no rows."""
    return {col: np.zeros(0, dtype=dt) for col, dt in CHANGE_COLUMNS.items()}


def measure_changes(ref, new, x, y, mag_ref, mag_new, truth_path=None,
                    r_ap: float = phot.DEFAULT_R_AP, r_in: float = phot.DEFAULT_R_IN,
                    r_out: float = phot.DEFAULT_R_OUT) -> dict:
    """dmag (eq. 1-2), S/N and signed flux change of each change, by
    :func:`rtcnn.photometry.magdiff`.

    Parameters
    ----------
    ref, new : rtcnn.io.Image
        The pair, on one pixel grid.
    x, y : (M,) float
        Positions, 0-based px.
    mag_ref, mag_new : (M,) float
        Truth AB magnitudes, NaN where the object is absent from that image's truth.
    truth_path : path-like, optional
        Where star catalogs for eq. 3 are looked for (:func:`pair_zeropoints`).
    r_ap, r_in, r_out : float
        Radii, px.

    Returns
    -------
    dict
        (M,) arrays ``dmag`` (mag, NaN when both sides are limits), ``lower_limit`` (bool:
        one side is a limit), ``snr`` (measured S/N of the flux change), ``dflux``
        (``F_new - F_ref`` in reference image units from the magnitudes used: catalog
        where known, else aperture or limit) and ``method`` ('catalog' | 'aperture' |
        'limit': the weakest source used), plus ``zeropoint`` (ref, new).
    """
    zp_ref, zp_new = pair_zeropoints(ref, new, mag_ref, mag_new, truth_path, r_ap, r_in, r_out)
    xy = np.column_stack([x, y])
    tab = phot.magdiff(ref.data, new.data, xy, mag_ref, mag_new,
                       0.0 if zp_ref is None else zp_ref, 0.0 if zp_new is None else zp_new,
                       r_ap=r_ap, r_in=r_in, r_out=r_out,
                       apcorr=phot.image_aperture_correction(new, r_ap, r_in, r_out),
                       mask_ref=ref.mask, mask_new=new.mask)  # fmt: skip
    m_ref = np.asarray(tab["m_ref"], dtype=np.float64)
    m_new = np.asarray(tab["m_new"], dtype=np.float64)
    zp0 = 0.0 if zp_ref is None else zp_ref
    with np.errstate(invalid="ignore", over="ignore"):
        dflux = phot.mag_to_flux(m_new, zp0) - phot.mag_to_flux(m_ref, zp0)
    measured = (np.asarray(tab["flux_new"], float) * 10.0 ** (-0.4 * ((zp_new or 0.0) - zp0))
                - np.asarray(tab["flux_ref"], float))
    dflux = np.where(np.isfinite(dflux), dflux, measured)
    sides = np.stack([np.asarray(tab["src_ref"]).astype(str),
                      np.asarray(tab["src_new"]).astype(str)])
    method = np.where((sides == "limit").any(0), "limit",
                      np.where((sides == "aperture").any(0), "aperture", "catalog"))
    return {"dmag": np.asarray(tab["magdiff"], dtype=np.float64),
            "lower_limit": np.asarray(tab["lower_limit"], dtype=bool),
            "snr": np.asarray(tab["snr_diff"], dtype=np.float64), "dflux": dflux,
            "method": method, "zeropoint": (zp_ref, zp_new)}


def truth_dmag(truth: Table, ref, new, truth_path=None) -> np.ndarray | None:
    """Truth dmag of every row of ``truth`` for the score: :func:`measure_changes`'s
    dmag, NaN where it is a lower limit (a limit is not a value to compare with).

    Returns
    -------
    (M,) float64 or None
        None when a zero point is needed and none can be had (the score then uses the
        truth's own magnitudes), or the table is empty.
    """
    if len(truth) == 0:
        return None
    try:
        meas = measure_changes(ref, new, masked_to_nan(truth, "x"), masked_to_nan(truth, "y"),
                               masked_to_nan(truth, "mag_ref"), masked_to_nan(truth, "mag_new"),
                               truth_path)  # fmt: skip
    except RtcnnInputError as err:
        log.warning("truth dmag from the catalog magnitudes: %s", err)
        return None
    return np.where(meas["lower_limit"], np.nan, meas["dmag"])


def pair_zeropoints(ref, new, mag_ref, mag_new, truth_path=None,
                    r_ap: float = phot.DEFAULT_R_AP, r_in: float = phot.DEFAULT_R_IN,
                    r_out: float = phot.DEFAULT_R_OUT) -> tuple:
    """Zero points (ref, new): header, else eq. (3) from a star catalog, else None.

    None is acceptable only when every change has catalog magnitudes in both images
    (eq. 1 needs no zero point); otherwise it is an error naming the image.
    """
    zps = []
    for side, img in (("ref", ref), ("new", new)):
        if img.zeropoint is not None:
            zps.append(float(img.zeropoint))
            continue
        stars = star_catalog(truth_path, ref)
        if stars is not None:
            col = f"mag_{side}" if f"mag_{side}" in stars.colnames else "mag"
            zp = phot.zeropoint_from_stars(
                img.data, np.column_stack([stars["x"], stars["y"]]), masked_to_nan(stars, col),
                r_ap=r_ap, r_in=r_in, r_out=r_out, mask=img.mask, path=img.path)
            log.info("%s: no zero point in the header; eq. (3) from %d stars gives %.3f mag",
                     img.path, zp.n_used, zp.value)
            zps.append(zp.value)
            continue
        if np.isfinite(mag_ref).all() and np.isfinite(mag_new).all():
            zps.append(None)
            continue
        raise RtcnnInputError(
            img.path, "no zero point in the header (MAGZP...) and no star catalog "
            f"({', '.join(STAR_CATALOG_NAMES)} or kind='star' rows) to estimate it (eq. 3); "
            "needed for the magnitude of changes missing from one image")
    return tuple(zps)


def star_catalog(truth_path, ref) -> Table | None:
    """Stars (kind == 'star') from the truth table or a sources/stars catalog beside it
    (beside ``ref`` when there is no truth), or None."""
    from rtcnn.io import read_truth

    folder = Path(truth_path if truth_path is not None else ref.path).parent
    candidates = ([truth_path] if truth_path is not None else []) + [
        folder / n for n in STAR_CATALOG_NAMES]
    for path in candidates:
        if not Path(path).is_file():
            continue
        table = read_truth(path, image=ref)
        if "kind" in table.colnames:
            table = table[np.asarray(table["kind"]).astype(str) == "star"]
        elif Path(path) == Path(truth_path or ""):
            continue
        if len(table) >= phot.ZP_MIN_STARS and ({"mag", "mag_ref"} & set(table.colnames)):
            return table
    return None


__all__ = [
    "CHANGE_COLUMNS", "STAR_CATALOG_NAMES", "empty_changes", "in_footprint", "masked_to_nan",
    "measure_changes", "pair_zeropoints", "star_catalog", "truth_changes", "truth_dmag",
    "truth_on_image",
]
