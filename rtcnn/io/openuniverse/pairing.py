"""OpenUniverse pairing policy: index the exposures, choose a reference for each new image.

:func:`scan_ou` indexes a directory (headers, WCS, transient ids from the truth),
:func:`select_pairs` picks for every new image a same-band reference that overlaps it
and was taken when none of its transients was active (or the earliest one, or any
before an MJD cut), :func:`write_pair_list` / :func:`read_pair_list` keep that choice
in an editable ECSV/CSV file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rtcnn.errors import RtcnnInputError
from rtcnn.io.catalogs import read_table
from rtcnn.io.openuniverse.layout import (
    IMAGE_DIR,
    IMAGE_RE,
    OUKey,
    find_obseq,
    ou_truth_path,
    parse_ou_name,
    truth_path_for,
)
from rtcnn.io.openuniverse.readers import (
    _header_float,
    _read_wcs,
    header_zptmag,
    read_obseq,
    read_ou_header,
    read_ou_truth,
)
from rtcnn.io.pairdir import atomic_write

log = logging.getLogger(__name__)

PAIR_MODES = ("quiet", "earliest", "before")
MIN_OVERLAP = 0.5  # minimum fraction of the new image the reference must cover
OVERLAP_SAMPLES = 16  # grid points per axis used to estimate the overlap fraction


@dataclasses.dataclass
class OUExposure:
    """One exposure (one SCA of one pointing) found under a root.

    ``transients`` holds the ids of on-chip ``obj_type == transient`` truth rows (None
    without a truth file).
    """

    key: OUKey
    image: Path
    truth: Path | None
    mjd: float
    exptime: float
    zptmag: float
    shape: tuple[int, int]
    wcs: WCS = dataclasses.field(repr=False)
    transients: frozenset | None = None


def scan_ou(root: str | os.PathLike, bands: Iterable[str] | None = None,
            obseq: str | os.PathLike | None = None,
            headers: Mapping[Path, fits.Header] | None = None) -> list[OUExposure]:
    """Index every OpenUniverse image under ``root``.

    Reads each image's headers (not its pixels) and truth table. The MJD comes from the
    header ``MJD-OBS``; when an obseq table is found (:func:`find_obseq`) or given, its
    band and MJD for the pointing are checked against the header.

    Parameters
    ----------
    root : path
        The ``RomanTDS`` directory (holding ``images/simple_model``).
    bands : iterable of str, optional
        Only these bands.
    obseq : path, optional
        Observation sequence file.
    headers : mapping of pathlib.Path to astropy.io.fits.Header, optional
        Image headers read beforehand (as :func:`read_ou_header` returns them), keyed by
        image path under ``root``: those images are indexed, and need not exist yet
        (:mod:`rtcnn.io.remote` reads headers off a remote archive and downloads only the
        images of the chosen pairs). Truth tables are still read from ``root``.

    Returns
    -------
    list of OUExposure, sorted by key.

    Raises
    ------
    RtcnnInputError
        ``root`` missing, no images, unreadable headers, header/obseq disagreement.
    """
    root = Path(root)
    if not root.is_dir():
        raise RtcnnInputError(root, "directory not found")
    base = root / IMAGE_DIR
    if headers is not None:
        headers = {Path(f): h for f, h in headers.items()}
    files = sorted(headers) if headers is not None else sorted(
        f for f in base.glob("*/*/Roman_TDS_simple_model_*") if IMAGE_RE.match(f.name))
    wanted = None if bands is None else {b.upper() for b in bands}
    if wanted is not None:
        files = [f for f in files if parse_ou_name(f).band in wanted]
    if not files:
        raise RtcnnInputError(
            root, f"no OpenUniverse images found (expected {IMAGE_DIR}/{{band}}/{{pointing}}/"
            "Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz"
            + (f" in bands {', '.join(sorted(wanted))}" if wanted else "") + ")")
    obseq_path = Path(obseq) if obseq is not None else find_obseq(root)
    seq = read_obseq(obseq_path) if obseq_path is not None else None
    out = []
    for f in files:
        key = parse_ou_name(f)
        if f.parent.name != str(key.pointing) or f.parent.parent.name.upper() != key.band:
            raise RtcnnInputError(f, f"lies in {f.parent.parent.name}/{f.parent.name}, not "
                                  f"{key.band}/{key.pointing}")
        header = headers[f] if headers is not None else read_ou_header(f)
        mjd = _header_float(header, "MJD-OBS", f)
        exptime = _header_float(header, "EXPTIME", f)
        zptmag = header_zptmag(header, f)
        if seq is not None:
            if key.pointing >= len(seq):
                raise RtcnnInputError(f, f"pointing {key.pointing} is beyond the "
                                      f"{len(seq)} rows of {obseq_path}")
            row = seq[key.pointing]
            if row["band"] != key.band or abs(float(row["mjd"]) - mjd) > 1e-3:
                raise RtcnnInputError(
                    f, f"band {key.band}, MJD {mjd:.5f} disagree with row {key.pointing} of "
                    f"{obseq_path} ({row['band']}, MJD {float(row['mjd']):.5f})")
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        truth = ou_truth_path(root, key)
        transients = None
        if truth.is_file():
            t = read_ou_truth(truth, zptmag, shape)
            transients = frozenset(str(i) for i in t["id"][t["kind"] == "transient"])
        else:
            truth = None
        out.append(OUExposure(key, f, truth, mjd, exptime, zptmag, shape,
                              _read_wcs(header, f), transients))
    return sorted(out, key=lambda e: e.key)


def overlap_fraction(new: OUExposure, ref: OUExposure, samples: int = OVERLAP_SAMPLES) -> float:
    """Fraction of ``new``'s pixels that fall on ``ref``'s chip (0 to 1).

    Estimated on a ``samples`` x ``samples`` grid of pixel centres through both WCSs.
    """
    ny, nx = new.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, samples), np.linspace(0, ny - 1, samples))
    sky = new.wcs.pixel_to_world(gx.ravel(), gy.ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = ref.wcs.world_to_pixel(sky)
    rny, rnx = ref.shape
    inside = (x >= -0.5) & (x < rnx - 0.5) & (y >= -0.5) & (y < rny - 0.5)
    return float(np.mean(inside))


def _footprint(e: OUExposure) -> tuple[np.ndarray, float]:
    """Unit vector of the chip centre and the centre-to-corner angle in rad."""
    ny, nx = e.shape
    sky = e.wcs.pixel_to_world([(nx - 1) / 2, 0.0], [(ny - 1) / 2, 0.0])
    ra, dec = sky.spherical.lon.rad, sky.spherical.lat.rad
    vec = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    return vec[0], float(np.arccos(np.clip(vec[0] @ vec[1], -1.0, 1.0)))


def _read_windows(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    t = read_table(Path(path))
    lower = {c.lower(): c for c in t.colnames}
    need = ("object_id", "start_mjd", "end_mjd")
    if not all(n in lower for n in need):
        raise RtcnnInputError(path, "a transient-window table needs columns object_id, "
                              f"start_mjd, end_mjd (found: {', '.join(t.colnames)})")
    return {str(i).strip(): (float(s), float(e)) for i, s, e in
            zip(t[lower["object_id"]], t[lower["start_mjd"]], t[lower["end_mjd"]])}


def select_pairs(
    exposures: Sequence[OUExposure],
    mode: str = "quiet",
    mjd_cut: float | None = None,
    min_overlap: float = MIN_OVERLAP,
    need_transients: bool = True,
    windows: str | os.PathLike | None = None,
) -> Table:
    """Choose a reference for every new image.

    A reference is an exposure in the same band that covers at least ``min_overlap`` of
    the new image and was taken before it; among those allowed by ``mode`` the one with
    the largest overlap wins (ties: the earliest).

    Modes
    -----
    ``'quiet'``
        The reference was taken while none of the new image's transients was active:
        with ``windows`` (a table ``object_id, start_mjd, end_mjd``), its MJD lies outside
        every window; otherwise none of those transients appears in its truth table.
    ``'earliest'``
        The earliest overlapping exposure of the band.
    ``'before'``
        References are exposures with MJD < ``mjd_cut``, new images those at or after it.

    Parameters
    ----------
    exposures : sequence of OUExposure
        From :func:`scan_ou`.
    mode : str
        One of :data:`PAIR_MODES`.
    mjd_cut : float, optional
        Required for ``'before'``.
    min_overlap : float
        Minimum covered fraction of the new image, 0 to 1.
    need_transients : bool
        Only new images whose truth lists an on-chip transient (those without truth are
        skipped too).
    windows : path, optional
        Transient activity windows for ``'quiet'``.

    Returns
    -------
    astropy.table.Table
        One row per pair: ``name``, ``band``, ``pointing_ref``, ``sca_ref``,
        ``pointing_new``, ``sca_new``, ``mjd_ref``, ``mjd_new``, ``overlap``, ``ref``,
        ``new``, ``truth_ref``, ``truth_new`` (paths as str, '' where absent). Zero rows
        when nothing qualifies.
    """
    if mode not in PAIR_MODES:
        raise RtcnnInputError(None, f"pair mode must be one of {', '.join(PAIR_MODES)}, "
                              f"got {mode!r}")
    if mode == "before" and mjd_cut is None:
        raise RtcnnInputError(None, "pair mode 'before' needs mjd_cut")
    if not 0.0 < min_overlap <= 1.0:
        raise RtcnnInputError(None, f"min_overlap must be in (0, 1], got {min_overlap}")
    win = _read_windows(windows) if windows is not None else None
    rows = []
    by_band: dict[str, list[OUExposure]] = {}
    for e in exposures:
        by_band.setdefault(e.key.band, []).append(e)
    foot = {id(e): _footprint(e) for e in exposures}  # cheap overlap pre-check
    for band, group in sorted(by_band.items()):
        group = sorted(group, key=lambda e: (e.mjd, e.key))
        for new in group:
            if need_transients and not new.transients:
                continue
            if mode == "before" and new.mjd < mjd_cut:
                continue
            best = None
            for ref in group:
                if ref is new or ref.mjd >= new.mjd:
                    continue
                if mode == "before" and ref.mjd >= mjd_cut:
                    continue
                if mode == "quiet" and not _quiet(new, ref, win):
                    continue
                (va, ra_), (vb, rb) = foot[id(new)], foot[id(ref)]
                if np.arccos(np.clip(va @ vb, -1.0, 1.0)) > ra_ + rb:
                    continue
                frac = overlap_fraction(new, ref)
                if frac < min_overlap:
                    continue
                score = (-ref.mjd, 0) if mode == "earliest" else (frac, -ref.mjd)
                if best is None or score > best[0]:
                    best = (score, ref, frac)
            if best is None:
                log.info("no reference for %s (mode %s)", new.image.name, mode)
                continue
            _, ref, frac = best
            rows.append(_pair_row(ref, new, frac))
    names = ("name", "band", "pointing_ref", "sca_ref", "pointing_new", "sca_new", "mjd_ref",
             "mjd_new", "overlap", "ref", "new", "truth_ref", "truth_new")
    dtypes = (str, str, int, int, int, int, float, float, float, str, str, str, str)
    t = Table(rows=rows, names=names, dtype=dtypes) if rows else Table(names=names, dtype=dtypes)
    t.meta["mode"] = mode
    if mjd_cut is not None:
        t.meta["mjd_cut"] = float(mjd_cut)
    return t


def _quiet(new: OUExposure, ref: OUExposure, win) -> bool:
    ids = new.transients or frozenset()
    if win is not None:
        for i in ids:
            if i in win and win[i][0] <= ref.mjd <= win[i][1]:
                return False
        return True
    if ref.transients is None:
        return False  # no truth: cannot tell
    return not (ids & ref.transients)


def _pair_row(ref: OUExposure, new: OUExposure, frac: float) -> tuple:
    name = f"{new.key.stem}_ref{ref.key.pointing}_{ref.key.sca}"
    return (name, new.key.band, ref.key.pointing, ref.key.sca, new.key.pointing, new.key.sca,
            ref.mjd, new.mjd, frac, str(ref.image), str(new.image),
            str(ref.truth or ""), str(new.truth or ""))


def write_pair_list(pairs: Table, path: str | os.PathLike) -> Path:
    """Write a pair list (ECSV, or CSV when ``path`` ends with ``.csv``) for editing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = "ascii.csv" if p.suffix.lower() == ".csv" else "ascii.ecsv"
    return atomic_write(p, True, lambda tmp: pairs.write(tmp, format=fmt))


def read_pair_list(path: str | os.PathLike) -> Table:
    """Read a (possibly hand-edited) pair list; needs at least ``ref`` and ``new``.

    Missing ``name``/``band``/``truth_*`` columns are filled from the file names.
    """
    p = Path(path)
    t = read_table(p)
    for need in ("ref", "new"):
        if need not in t.colnames:
            raise RtcnnInputError(p, f"pair list needs columns ref and new (found: "
                                  f"{', '.join(t.colnames)})")
    refs = [str(v) for v in t["ref"]]
    news = [str(v) for v in t["new"]]
    keys_ref = [parse_ou_name(r) for r in refs]
    keys_new = [parse_ou_name(n) for n in news]
    for r, n, kr, kn in zip(refs, news, keys_ref, keys_new):
        if kr.band != kn.band:
            raise RtcnnInputError(p, f"pair {Path(n).name} / {Path(r).name} mixes bands "
                                  f"{kn.band} and {kr.band}")
    if "name" not in t.colnames:
        t["name"] = [f"{kn.stem}_ref{kr.pointing}_{kr.sca}" for kr, kn in zip(keys_ref, keys_new)]
    if len(set(t["name"])) != len(t):
        raise RtcnnInputError(p, "pair names must be unique")
    for col, keys, paths in (("truth_ref", keys_ref, refs), ("truth_new", keys_new, news)):
        if col not in t.colnames:
            t[col] = [str(truth_path_for(q)) if truth_path_for(q).is_file() else ""
                      for q in paths]
    t["ref"] = refs
    t["new"] = news
    t["truth_ref"] = ["" if isinstance(v, np.ma.core.MaskedConstant) else str(v)
                      for v in t["truth_ref"]]
    t["truth_new"] = ["" if isinstance(v, np.ma.core.MaskedConstant) else str(v)
                      for v in t["truth_new"]]
    return t


__all__ = [
    "MIN_OVERLAP",
    "OUExposure",
    "OVERLAP_SAMPLES",
    "PAIR_MODES",
    "overlap_fraction",
    "read_pair_list",
    "scan_ou",
    "select_pairs",
    "write_pair_list",
]
