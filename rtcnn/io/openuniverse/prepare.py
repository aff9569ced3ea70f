"""OpenUniverse pairs written as rtcnn pair directories (:mod:`rtcnn.io.pairdir`).

:func:`prepare_pairs` takes the pair list of :mod:`rtcnn.io.openuniverse.pairing` and
writes each pair in the simulator's pair-directory format (``ref.fits``, ``new.fits``,
``truth.ecsv``, ``sources.ecsv``, ``params.json``; all files or none) with the reference
resampled onto the new image's pixel grid by :func:`reproject_image` (``reproject``;
flux-conserving by default, pixels outside the reference footprint masked). Every command
and the DataModule then read those directories like simulated pairs.
:func:`pair_images` / :func:`write_pair_images` do the same for any two images with a
FITS WCS (:mod:`rtcnn.io.asdf`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import FITSFixedWarning

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import Image
from rtcnn.io.openuniverse.layout import parse_ou_name
from rtcnn.io.openuniverse.pairing import (
    MIN_OVERLAP,
    read_pair_list,
    scan_ou,
    select_pairs,
    write_pair_list,
)
from rtcnn.io.openuniverse.readers import (
    _id_column,
    read_ou_error,
    read_ou_image,
    read_ou_truth_for,
)
from rtcnn.io.pairdir import (
    NEW_NAME,
    PARAMS_NAME,
    REF_NAME,
    SOURCES_NAME,
    TRUTH_NAME,
    is_complete,
    read_params,
    write_pair,
)
from rtcnn.roman import noise_equivalent_area

log = logging.getLogger(__name__)

REPROJECT_METHODS = ("adaptive", "interp")
HOST_RADIUS = 1.0  # arcsec: a transient within this distance of a truth galaxy is hosted
PAIR_LIST_NAME = "pairs.ecsv"  # pair list written by prepare_pairs in its output directory
PAIR_MARKER = "openuniverse"  # params.json "source" of pair directories written here


def reproject_image(image: Image, target: Image, method: str = "adaptive") -> Image:
    """Resample ``image`` onto ``target``'s pixel grid.

    ``'adaptive'`` uses :func:`reproject.reproject_adaptive` with ``conserve_flux=True``
    (per-pixel e-/s are rescaled by the pixel-area ratio, so a source's total flux and
    the zero point are unchanged); ``'interp'`` uses bilinear
    :func:`reproject.reproject_interp` (surface brightness conserved: right when the two
    grids have the same pixel area, e.g. dithers of one SCA). Bad input pixels propagate
    as NaN; output pixels not fully covered by the input (footprint < 1) are masked.
    The coordinate round-trip check of ``reproject`` is skipped (``roundtrip_coords=
    False``: half the time; the two grids overlap, so the mapping is invertible there).

    Returns
    -------
    Image
        Same ``unit``, ``zeropoint``, ``band``, ``exptime`` as ``image``; ``wcs`` and shape
        of ``target``; ``mask`` = outside the footprint or touched by a bad pixel.
    """
    import reproject

    if method not in REPROJECT_METHODS:
        raise RtcnnInputError(None, f"reprojection method must be one of "
                              f"{', '.join(REPROJECT_METHODS)}, got {method!r}")
    src_wcs = image.require_wcs("reproject it")
    dst_wcs = target.require_wcs("reproject onto it")
    data = np.array(image.data, dtype=np.float64)
    if image.mask is not None:
        data[image.mask] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        if method == "adaptive":
            out, foot = reproject.reproject_adaptive(
                (data, src_wcs), dst_wcs, shape_out=target.shape, conserve_flux=True,
                boundary_mode="strict", bad_value_mode="strict", return_footprint=True,
                roundtrip_coords=False)
        else:
            out, foot = reproject.reproject_interp(
                (data, src_wcs), dst_wcs, shape_out=target.shape, return_footprint=True,
                roundtrip_coords=False)
    out = out.astype(np.float32)
    bad = ~np.isfinite(out) | (foot < 1.0 - 1e-6)
    out[bad] = np.nan
    header = target.header.copy()
    for key in ("MJD-OBS", "EXPTIME", "SKYLEVEL", "MAGZP", "POINTING", "SCA", "SCA_NUM",
                "ZPTMAG", "SKY_MEAN", "DATE-OBS"):
        if key in image.header:
            header[key] = image.header[key]
    header["REPROJ"] = (method, "resampled onto the new image's grid")
    if image.path is not None:
        header["ORIGFILE"] = Path(image.path).name
    return Image(data=out, mask=bad if bad.any() else None, wcs=dst_wcs,
                 zeropoint=image.zeropoint, unit=image.unit, header=header, path=image.path,
                 band=image.band, exptime=image.exptime, hdu=image.hdu,
                 zeropoint_source=image.zeropoint_source)


def same_pixel_grid(a: Image, b: Image, tol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` have one shape and their WCSs agree to ``tol`` px.

    Checked on a 5 x 5 grid of pixel centres (sky through ``a``, back through ``b``).
    """
    if a.shape != b.shape or a.wcs is None or b.wcs is None:
        return False
    ny, nx = a.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    x, y = b.wcs.world_to_pixel(a.wcs.pixel_to_world(gx.ravel(), gy.ravel()))
    return bool(np.max(np.hypot(x - gx.ravel(), y - gy.ravel())) < tol)


def pair_truth(ref_truth: Table, new_truth: Table, new: Image, ref_on_new: Image,
               err_ref: np.ndarray | None = None, err_new: np.ndarray | None = None,
               sca: int | None = None) -> tuple[Table, Table]:
    """Truth of a pair in the simulator's format, on the new image's grid.

    Transients are the ``kind == 'transient'`` rows of either truth table; positions
    come from the new table where the object is listed there, else from RA/Dec through
    the new image's WCS. Rows off the new chip or outside the (reprojected) reference
    footprint are left out. ``mag_ref`` / ``mag_new`` are the AB truth magnitudes,
    masked where the object is absent from that image's truth (there the DataModule
    measures the flux by aperture photometry, as for simulated pairs).

    ``snr`` is the PSF S/N of the flux change in the difference image,
    ``|dF| / sqrt(NEA (err_ref^2 + err_new^2) + F_ref/t_ref + F_new/t_new)`` with
    ``F`` in e-/s, ``err`` the per-pixel ERR planes in e-/s at the position (0 if not
    given) and NEA from :func:`noise_equivalent_area`. ``host`` is True when a truth
    galaxy lies within :data:`HOST_RADIUS` arcsec.

    Returns
    -------
    (truth, sources) : (Table, Table)
        ``truth``: ``id, x, y, ra, dec, mag_ref, mag_new, kind, host, snr``;
        ``sources``: every object of both tables on the new chip with ``id, x, y, ra,
        dec, mag_ref, mag_new, kind``.
    """
    from astropy.coordinates import SkyCoord

    ny, nx = new.shape
    wcs = new.require_wcs("place truth objects on it")
    ref_idx = {str(i): k for k, i in enumerate(ref_truth["id"])}
    new_idx = {str(i): k for k, i in enumerate(new_truth["id"])}
    ids = list(dict.fromkeys([str(i) for i in new_truth["id"]]
                             + [str(i) for i in ref_truth["id"]]))
    n = len(ids)
    rows = [(new_truth, new_idx[i]) if i in new_idx else (ref_truth, ref_idx[i]) for i in ids]
    objs = Table()
    objs["id"] = _id_column([t["id"][k] for t, k in rows]) if n else np.zeros(0, np.int64)
    objs["x"] = np.array([float(t["x"][k]) if t is new_truth else np.nan for t, k in rows])
    objs["y"] = np.array([float(t["y"][k]) if t is new_truth else np.nan for t, k in rows])
    objs["ra"] = np.array([float(t["ra"][k]) for t, k in rows]) * u.deg
    objs["dec"] = np.array([float(t["dec"][k]) for t, k in rows]) * u.deg
    mref = np.array([float(ref_truth["mag"][ref_idx[i]]) if i in ref_idx else np.nan
                     for i in ids])
    mnew = np.array([float(new_truth["mag"][new_idx[i]]) if i in new_idx else np.nan
                     for i in ids])
    objs["mag_ref"] = _masked_mag(mref)
    objs["mag_new"] = _masked_mag(mnew)
    objs["kind"] = np.array([str(t["kind"][k]) for t, k in rows], dtype=str)
    need = ~np.isfinite(np.asarray(objs["x"]))
    if need.any():  # only in the reference truth: place through the new image's WCS
        coord = SkyCoord(np.asarray(objs["ra"])[need], np.asarray(objs["dec"])[need], unit="deg")
        objs["x"][need], objs["y"][need] = wcs.world_to_pixel(coord)
    objs["x"].unit = objs["y"].unit = u.pix
    x, y = np.asarray(objs["x"]), np.asarray(objs["y"])
    on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    ix = np.clip(np.round(np.nan_to_num(x)).astype(int), 0, nx - 1)
    iy = np.clip(np.round(np.nan_to_num(y)).astype(int), 0, ny - 1)
    covered = on.copy()
    if ref_on_new.mask is not None:
        covered &= ~ref_on_new.mask[iy, ix]

    sources = objs[on]
    sel = covered & (np.asarray(objs["kind"]) == "transient")
    truth = objs[sel]
    truth["host"] = _hosted(np.asarray(truth["ra"]), np.asarray(truth["dec"]), new_truth)
    truth["snr"] = _snr(mref[sel], mnew[sel], ix[sel], iy[sel], new, ref_on_new,
                        err_ref, err_new, sca)
    for t in (truth, sources):
        t.meta["pixel_origin"] = 0
        t.meta["source"] = PAIR_MARKER
    return truth, sources


def _masked_mag(values) -> MaskedColumn:
    v = np.asarray(values, dtype=float)
    return MaskedColumn(np.where(np.isfinite(v), v, 0.0), mask=~np.isfinite(v), unit=u.mag)


def _hosted(ra, dec, table: Table) -> np.ndarray:
    from astropy.coordinates import SkyCoord

    gal = table[table["kind"] == "galaxy"]
    if len(ra) == 0 or len(gal) == 0:
        return np.zeros(len(ra), dtype=bool)
    c = SkyCoord(np.asarray(ra, float), np.asarray(dec, float), unit="deg")
    g = SkyCoord(np.asarray(gal["ra"], float), np.asarray(gal["dec"], float), unit="deg")
    _, sep, _ = c.match_to_catalog_sky(g)
    return np.asarray(sep.arcsec <= HOST_RADIUS)


def _snr(mref, mnew, ix, iy, new: Image, ref: Image, err_ref, err_new, sca) -> np.ndarray:
    if len(ix) == 0:
        return np.zeros(0)

    def rate(m, img):
        m = np.asarray(m, float)
        return np.where(np.isfinite(m), 10 ** (-0.4 * (m - img.zeropoint)), 0.0)

    f_ref, f_new = rate(mref, ref), rate(mnew, new)
    nea = noise_equivalent_area(new.band, int(sca)) if sca is not None else 10.0
    var = np.zeros(len(ix))
    for err in (err_ref, err_new):
        if err is not None:
            var += nea * np.asarray(err, float)[iy, ix] ** 2
    var += f_ref / (ref.exptime or 1.0) + f_new / (new.exptime or 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(f_new - f_ref) / np.sqrt(var)
    return np.where(np.isfinite(snr), snr, 0.0)


def pair_header(img: Image, role: str, **extra) -> fits.Header:
    """Header of a pair-directory image: WCS and the simulator's keywords.

    ``BUNIT``, ``BAND``, ``EXPTIME``, ``MAGZP``, ``SKYLEVEL``, ``MJD-OBS``, ``SCA``,
    ``POINTING`` (those known), ``PAIRROLE`` = ``role``, ``ORIGFILE``, ``REPROJ``, plus
    ``extra`` cards.
    """
    if img.wcs is not None and not hasattr(img.wcs, "to_header"):
        raise RtcnnInputError(img.path, "a pair image needs a FITS WCS (read ASDF images "
                              "with wcs='fits')")
    h = img.wcs.to_header(relax=True) if img.wcs is not None else fits.Header()
    h["BUNIT"] = img.unit
    cards = {"BAND": img.band, "EXPTIME": img.exptime, "MAGZP": img.zeropoint}
    for key in ("SKYLEVEL", "MJD-OBS", "SCA", "POINTING", "REPROJ"):
        cards[key] = img.header.get(key)
    cards.update(PAIRROLE=role, ORIGFILE=Path(img.path).name if img.path else None, **extra)
    for key, value in cards.items():
        if value is not None:
            h[key] = value
    return h


def pair_images(ref: Image, new: Image, method: str = "adaptive",
                **extra) -> tuple[dict[str, fits.HDUList], Image]:
    """The ``ref.fits`` / ``new.fits`` of a pair: the reference on the new image's grid.

    The reference is resampled (:func:`reproject_image`) unless the two are on one pixel
    grid already (:func:`same_pixel_grid`). Bad pixels (masks, outside the reference
    footprint) become NaN, so :func:`rtcnn.io.read_image` masks them again. ``extra``
    header cards go to both.

    Returns
    -------
    (dict, Image)
        ``{"ref.fits": HDUList, "new.fits": HDUList}`` for :func:`rtcnn.io.pairdir.write_pair`,
        and the reference on the new image's grid.
    """
    if same_pixel_grid(ref, new):
        ref_on_new = dataclasses.replace(ref, header=ref.header.copy())
        ref_on_new.header["REPROJ"] = ("none", "same pixel grid as the new image")
    else:
        ref_on_new = reproject_image(ref, new, method)
    files = {}
    for img, role, name in ((ref_on_new, "ref", REF_NAME), (new, "new", NEW_NAME)):
        data = np.array(img.data, dtype=np.float32)
        if img.mask is not None:
            data[img.mask] = np.nan
        files[name] = fits.HDUList([fits.PrimaryHDU(data, pair_header(img, role, **extra))])
    return files, ref_on_new


def write_pair_images(ref: Image, new: Image, outdir: str | os.PathLike,
                      method: str = "adaptive", **extra) -> tuple[Path, Image]:
    """Write :func:`pair_images` as the pair directory ``outdir`` (replacing those files).

    Returns
    -------
    (pathlib.Path, Image)
        The pair directory and the reference on the new image's grid.
    """
    files, ref_on_new = pair_images(ref, new, method, **extra)
    return write_pair(outdir, files, overwrite=True), ref_on_new


def write_pair_dir(row, outdir: str | os.PathLike, method: str = "adaptive") -> Path:
    """Write one pair (a row of a pair list) in the simulator's pair-directory format.

    ``new.fits`` is the new image (e-/s, sky-subtracted, bad pixels NaN), ``ref.fits``
    the reference resampled onto its grid (:func:`reproject_image`; not resampled when
    the two WCSs are identical), ``truth.ecsv`` / ``sources.ecsv`` from
    :func:`pair_truth`, ``params.json`` the provenance; all written at once
    (:func:`rtcnn.io.pairdir.write_pair`).
    """
    new = read_ou_image(row["new"])
    ref = read_ou_image(row["ref"])
    kn, kr = parse_ou_name(row["new"]), parse_ou_name(row["ref"])
    files, ref_on_new = pair_images(ref, new, method, SIMMODE="openuniverse")
    same_grid = ref_on_new.header["REPROJ"] == "none"
    err_new = read_ou_error(row["new"])
    err_ref = read_ou_error(row["ref"])  # not resampled: ERR varies slowly (sky + read)
    if err_ref.shape != new.shape:
        err_ref = None
    empty = Table({"id": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0),
                   "x": np.zeros(0), "y": np.zeros(0), "mag": np.zeros(0),
                   "kind": np.zeros(0, str)})
    t_new = read_ou_truth_for(new, row["truth_new"]) if row["truth_new"] else empty
    t_ref = read_ou_truth_for(ref, row["truth_ref"]) if row["truth_ref"] else empty
    truth, sources = pair_truth(t_ref, t_new, new, ref_on_new, err_ref, err_new, kn.sca)
    for t, name in ((truth, TRUTH_NAME), (sources, SOURCES_NAME)):
        t.meta.update({"ref": str(row["ref"]), "new": str(row["new"])})
        files[name] = t
    files[PARAMS_NAME] = {
        "source": PAIR_MARKER, "name": str(row["name"]), "band": kn.band,
        "ref": str(row["ref"]), "new": str(row["new"]),
        "pointing_ref": kr.pointing, "sca_ref": kr.sca,
        "pointing_new": kn.pointing, "sca_new": kn.sca,
        "mjd_ref": float(ref.header["MJD-OBS"]), "mjd_new": float(new.header["MJD-OBS"]),
        "reproject": "none" if same_grid else method,
        "n_transients": len(truth)}  # fmt: skip
    return write_pair(Path(outdir) / str(row["name"]), files, overwrite=True)


def _complete(d: Path, row) -> bool:
    """``d`` holds the whole pair of ``row`` (a cache hit)."""
    if not is_complete(d, (REF_NAME, NEW_NAME, TRUTH_NAME, PARAMS_NAME)):
        return False
    params = read_params(d) or {}
    return params.get("ref") == str(row["ref"]) and params.get("new") == str(row["new"])


def prepare_pairs(
    root: str | os.PathLike,
    outdir: str | os.PathLike,
    pair_list: str | os.PathLike | None = None,
    mode: str = "quiet",
    mjd_cut: float | None = None,
    bands: Sequence[str] | None = None,
    min_overlap: float = MIN_OVERLAP,
    method: str = "adaptive",
    windows: str | os.PathLike | None = None,
    obseq: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Find pairs under an OpenUniverse ``root`` and write them as pair directories.

    The pair list is ``pair_list`` when that file exists (hand-edited), else it is made
    by :func:`scan_ou` + :func:`select_pairs` and written to ``pair_list`` (default
    ``outdir/pairs.ecsv``) for inspection and editing. Pair directories already written
    for the same ref/new files are kept (a cache) unless ``overwrite``; pair directories
    of this module no longer in the list are removed.

    Returns
    -------
    list of pathlib.Path
        The pair directories, in pair-list order.

    Raises
    ------
    RtcnnInputError
        Anything the readers raise, or no pair found.
    """
    outdir = Path(outdir)
    list_path = Path(pair_list) if pair_list is not None else outdir / PAIR_LIST_NAME
    if list_path.is_file() and pair_list is not None:
        pairs = read_pair_list(list_path)
        log.info("using the pair list %s (%d pairs)", list_path, len(pairs))
    else:
        exposures = scan_ou(root, bands, obseq)
        pairs = select_pairs(exposures, mode, mjd_cut, min_overlap, True, windows)
        if len(pairs) == 0:
            raise RtcnnInputError(root, f"no image pairs found (mode {mode}: every new image "
                                  "needs an earlier same-band image covering "
                                  f"{min_overlap:.0%} of it, and transients in its truth)")
        write_pair_list(pairs, list_path)
        log.info("wrote the pair list %s (%d pairs)", list_path, len(pairs))
    outdir.mkdir(parents=True, exist_ok=True)
    keep = {str(n) for n in pairs["name"]}
    for d in outdir.iterdir():
        if d.is_dir() and d.name not in keep and (read_params(d) or {}).get(
                "source") == PAIR_MARKER:
            shutil.rmtree(d)
    dirs = []
    for row in pairs:
        d = outdir / str(row["name"])
        if overwrite or not _complete(d, row):
            write_pair_dir(row, outdir, method)
        dirs.append(d)
    return dirs


__all__ = [
    "HOST_RADIUS",
    "PAIR_LIST_NAME",
    "PAIR_MARKER",
    "REPROJECT_METHODS",
    "pair_header",
    "pair_images",
    "pair_truth",
    "prepare_pairs",
    "reproject_image",
    "same_pixel_grid",
    "write_pair_dir",
    "write_pair_images",
]
