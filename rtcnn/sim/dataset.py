"""Simulate a data set of Roman image pairs and write it in the rtcnn layout.

Layout (the data contract, ``/work/brief.md``)::

    OUTDIR/pair_0000/ref.fits     primary HDU, float32 [y, x], e-/s, sky-subtracted
    OUTDIR/pair_0000/new.fits
    OUTDIR/pair_0000/truth.ecsv   objects whose flux changed (transients, variables)
    OUTDIR/pair_0000/sources.ecsv every object drawn
    OUTDIR/pair_0000/params.json  parameters + seed

Modes
-----
``inject`` (the paper's setting): ``new = ref + changes``, the reference's noise
realisation is reused and only the changes' own Poisson noise is added, so the
difference image is zero away from the changed objects. ``epochs``: two
independent exposures (independent noise, a new-epoch PSF with extra defocus and
a different jitter, unrejected cosmic rays in each) on the same pixel grid / WCS.

Tables
------
``truth.ecsv``: one row per object whose flux changed -- ``id, x, y`` (0-based px),
``ra, dec`` (deg), ``mag_ref, mag_new`` (AB, masked where absent), ``kind``
(transient | variable), ``host_id`` (-1 = none), ``host`` (bool), ``dflux``
(``F_new - F_ref``, e-/s) and ``snr``, the difference-image PSF-optimal S/N of the
change (background-limited)::

    snr = |F_new - F_ref| * sqrt(sum_i p_i**2) / sigma_diff

with ``p_i`` the unit-flux pixelated PSF of the new image at the object's
sub-pixel position and ``sigma_diff`` the background noise per pixel (e-/s) of the
difference: ``sqrt(sigma_ref**2 + sigma_new**2)`` in epochs mode, ``sigma_new`` in
inject mode (the reference noise is shared and cancels, so the S/N is quoted
against one image's noise). ``sigma = sqrt(zodi + thermal + dark + RN**2) /
exptime``; S/N = 5 is reached at ~25.8 AB (epochs) / ~26.2 AB (inject) in H158.
``sources.ecsv``: every object drawn, same columns plus ``hlr`` (arcsec), ``g1``,
``g2`` for galaxies, kind in star | galaxy | variable | transient.

Reproducibility: pair ``i`` of seed ``K`` uses ``numpy.random.SeedSequence(K,
spawn_key=(i,))`` only, headers carry no timestamps, so the same seed gives
byte-identical files (on the same library versions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import galsim
import numpy as np
from astropy.io import fits
from astropy.table import MaskedColumn, Table

from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import PAIR_FILES, make_output_dir, pair_dir, write_pair
from rtcnn.sim import render
from rtcnn.sim.scene import (
    MIN_SIZE, MODES, SCA_NPIX, SURVEY_MODES, Pointing, Scene, draw_pointing, make_scene,
    pair_band, resolve_params,
)

SNR_DOC = (
    "snr = |F_new - F_ref| * sqrt(sum_i p_i^2) / sigma_diff: F in e-/s, p the unit-flux "
    "pixelated PSF of the new image at the object's position, sigma_diff the background "
    "noise per pixel of the difference (epochs: sqrt(sigma_ref^2 + sigma_new^2); inject: "
    "sigma_new, the reference noise cancels)"
)


def check_args(pairs: Any, size: Any, mode: Any, seed: Any) -> None:
    """Validate the data-set arguments (one-line :class:`RtcnnInputError` each)."""
    for name, value in (("pairs", pairs), ("size", size), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise RtcnnInputError(None, f"{name} must be an integer, got {value!r}")
    if pairs < 1:
        raise RtcnnInputError(None, f"pairs must be >= 1, got {pairs}")
    if not MIN_SIZE <= size <= SCA_NPIX:
        raise RtcnnInputError(None, f"size must be in [{MIN_SIZE}, {SCA_NPIX}] px, got {size}")
    if mode not in MODES:
        raise RtcnnInputError(None, f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if seed < 0:
        raise RtcnnInputError(None, f"seed must be >= 0, got {seed}")


def simulate_dataset(
    outdir: str | os.PathLike,
    pairs: int,
    size: int,
    mode: str,
    seed: int,
    overwrite: bool = False,
    progress: bool = True,
    **scene_kwargs: Any,
) -> list[Path]:
    """Simulate ``pairs`` Roman image pairs of ``size x size`` px into ``outdir``.

    Parameters
    ----------
    outdir : str or os.PathLike
        Output directory (created if missing).
    pairs : int
        Number of pairs, >= 1.
    size : int
        Image side, px, 64..4088 (a cut-out of one SCA).
    mode : {'inject', 'epochs'}
        See the module docstring.
    seed : int
        >= 0; the same seed gives byte-identical files.
    overwrite : bool
        Replace existing pair directories; otherwise any existing one is an error
        raised before anything is written.
    progress : bool
        Show a tqdm progress bar over the pairs.
    **scene_kwargs
        Scene parameters, see :data:`rtcnn.sim.scene.DEFAULTS` (``band``, ``sca``,
        densities, magnitude ranges, ``forced_transients`` ...).

    Returns
    -------
    list of pathlib.Path
        The pair directories, in order.

    Raises
    ------
    RtcnnInputError
        Bad argument, unknown scene parameter, ``outdir`` not a directory, or an
        existing pair without ``overwrite``.
    """
    check_args(pairs, size, mode, seed)
    params = resolve_params(mode, size, **scene_kwargs)
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise RtcnnInputError(out, "exists and is not a directory")
    dirs = [pair_dir(out, i) for i in range(pairs)]
    if not overwrite:
        for d in dirs:
            if d.exists():
                raise RtcnnInputError(d, "pair already exists; pass --overwrite to replace it")
    make_output_dir(out)
    if not os.access(out, os.W_OK | os.X_OK):
        raise RtcnnInputError(out, "output directory is not writable")
    from tqdm.auto import tqdm  # local: keeps `import rtcnn.sim` light

    for i in tqdm(range(pairs), desc="simulate", unit="pair", disable=not progress):
        files = simulate_pair(i, size, mode, seed, params)
        write_pair(dirs[i], files, overwrite=overwrite)
    return dirs


def simulate_pair(index: int, size: int, mode: str, seed: int, params: dict) -> dict:
    """Simulate pair ``index`` in memory.

    Returns
    -------
    dict
        ``{"ref.fits": HDUList, "new.fits": HDUList, "truth.ecsv": Table,
        "sources.ecsv": Table, "params.json": dict}``.
    """
    if mode in SURVEY_MODES:  # exposures at other rolls, reference coadds
        from rtcnn.sim.survey import simulate_survey_pair

        return simulate_survey_pair(index, size, mode, seed, params)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    band = pair_band(params, seed, index)
    zp = render.magzp(band)
    pointing = draw_pointing(rng, size, params)
    scene = make_scene(rng, size, params)
    mjd_ref, mjd_new = params["mjd"], params["mjd"] + params["cadence_days"]
    wcs = render.cutout_wcs(pointing, mjd_ref)

    # PSFs: reference = nominal optics + jitter; new = the same (inject) or extra
    # defocus and its own jitter (epochs).
    sx, sy = render.psf_position(pointing, size)
    jit = [render.quantise(rng.uniform(*params["psf_jitter"]), render.JITTER_STEP) for _ in "rn"]
    defocus = render.quantise(
        rng.uniform(-params["psf_defocus"], params["psf_defocus"]), render.DEFOCUS_STEP
    )
    psf_ref = render.psf_model(band, pointing.sca, sx, sy, 0.0, jit[0], params["pupil_bin"])
    psf_new = (
        render.psf_model(band, pointing.sca, sx, sy, defocus, jit[1], params["pupil_bin"])
        if mode == "epochs" else psf_ref
    )
    bkg_ref = render.background(band, wcs, size, mjd_ref)
    bkg_new = render.background(band, wcs, size, mjd_new) if mode == "epochs" else bkg_ref

    static_ref = render.render_static(size, psf_ref, scene, scene.mag_ref, zp)
    ref = render.add_exposure_noise(static_ref, bkg_ref, rng)
    n_cr = [0, 0]
    if mode == "inject":
        changed = np.flatnonzero(scene.changed)
        delta = render.mag_to_flux(scene.mag_new[changed], zp) - render.mag_to_flux(
            scene.mag_ref[changed], zp
        )
        img = render.new_image(size)
        render.draw_points(img, psf_new, scene.x[changed], scene.y[changed], delta)
        new = ref + render.add_source_noise(img.array, bkg_new.exptime, rng)
        sigma_diff = bkg_new.sigma
    else:
        static_new = render.render_static(size, psf_new, scene, scene.mag_new, zp)
        new = render.add_exposure_noise(static_new, bkg_new, rng)
        cr = (params["cosmic_ray_density"], params["cosmic_ray_energy"],
              params["cosmic_ray_length"], bkg_ref.exptime)
        n_cr = [render.add_cosmic_rays(ref, rng, *cr), render.add_cosmic_rays(new, rng, *cr)]
        sigma_diff = float(np.hypot(bkg_ref.sigma, bkg_new.sigma))

    ra, dec = render.pixel_to_radec(wcs, scene.x, scene.y)
    sources = _sources_table(scene, ra, dec)
    truth = _truth_table(scene, ra, dec, zp, psf_new, sigma_diff)
    common = dict(band=band, zp=zp, pointing=pointing, mode=mode, seed=seed, index=index,
                  wcs_cards=render.wcs_header_cards(wcs, size))
    meta = {
        "band": band, "magzp": zp, "mode": mode, "seed": seed, "pair": index, "size": size,
        "exptime": bkg_ref.exptime, "sigma_diff": sigma_diff, "snr": SNR_DOC,
    }
    truth.meta.update(meta)
    sources.meta.update(meta)
    pair_params = {
        "pair": index, "seed": seed, "mode": mode, "size": size,
        "scene": params,
        "pointing": {
            "ra": pointing.ra, "dec": pointing.dec, "pa": pointing.pa, "sca": pointing.sca,
            "x0": pointing.x0, "y0": pointing.y0,
        },
        "psf": {
            "sca_pos": [sx, sy], "pupil_bin": params["pupil_bin"], "oversample": render.OVERSAMPLE,
            "box_px": render.PSF_BOX, "wavelength_nm": render.bandpass(band).effective_wavelength,
            "ref": {"defocus_waves": 0.0, "jitter_mas": jit[0]},
            "new": {"defocus_waves": psf_new.key[4], "jitter_mas": psf_new.key[5]},
        },
        "magzp": zp, "exptime": bkg_ref.exptime, "mjd_ref": mjd_ref, "mjd_new": mjd_new,
        "background_e": {"ref": _bkg_dict(bkg_ref), "new": _bkg_dict(bkg_new)},
        "sigma_diff": sigma_diff, "cosmic_rays": {"ref": n_cr[0], "new": n_cr[1]},
        "counts": {k: int(np.sum(scene.kind == k)) for k in ("star", "variable", "galaxy",
                                                            "transient")},
        "galsim_version": galsim.__version__,
    }
    return {
        "ref.fits": _hdulist(ref, bkg=bkg_ref, mjd=mjd_ref, epoch="ref", psf=psf_ref,
                             n_cr=n_cr[0], **common),
        "new.fits": _hdulist(new, bkg=bkg_new, mjd=mjd_new, epoch="new", psf=psf_new,
                             n_cr=n_cr[1], **common),
        "truth.ecsv": truth,
        "sources.ecsv": sources,
        "params.json": pair_params,
    }


def _bkg_dict(bkg: render.Background) -> dict:
    return {"zodi": bkg.zodi, "thermal": bkg.thermal, "dark": bkg.dark,
            "read_noise": bkg.read_noise, "sigma_eps": bkg.sigma}


def _mag_column(name: str, values: np.ndarray) -> MaskedColumn:
    return MaskedColumn(np.where(np.isfinite(values), values, 0.0), name=name,
                        mask=~np.isfinite(values), unit="mag", description="AB magnitude")


def _sources_table(scene: Scene, ra: np.ndarray, dec: np.ndarray) -> Table:
    t = Table()
    t["id"] = scene.id
    t["x"] = scene.x
    t["y"] = scene.y
    t["ra"] = ra
    t["dec"] = dec
    t["mag_ref"] = _mag_column("mag_ref", scene.mag_ref)
    t["mag_new"] = _mag_column("mag_new", scene.mag_new)
    t["kind"] = scene.kind
    t["hlr"] = scene.hlr
    t["g1"] = scene.g1
    t["g2"] = scene.g2
    t["host_id"] = scene.host_id
    for col, unit in (("x", "pix"), ("y", "pix"), ("ra", "deg"), ("dec", "deg"), ("hlr", "arcsec")):
        t[col].unit = unit
    t["x"].description = "0-based pixel column, integer = pixel centre"
    t["y"].description = "0-based pixel row, integer = pixel centre"
    return t


def _truth_table(scene: Scene, ra, dec, zp: float, psf: render.PsfModel, sigma_diff: float):
    idx = np.flatnonzero(scene.changed)
    dflux = render.mag_to_flux(scene.mag_new[idx], zp) - render.mag_to_flux(scene.mag_ref[idx], zp)
    snr = np.abs(dflux) * np.sqrt(render.psf_sum_sq(psf, scene.x[idx], scene.y[idx])) / sigma_diff
    t = _sources_table(scene, ra, dec)[idx]
    t.keep_columns(["id", "x", "y", "ra", "dec", "mag_ref", "mag_new", "kind", "host_id"])
    t["host"] = t["host_id"] >= 0
    t["dflux"] = dflux
    t["dflux"].unit = "electron/s"
    t["snr"] = snr
    t["snr"].description = SNR_DOC
    return t


def _hdulist(data, *, bkg, mjd, epoch, psf, n_cr, band, zp, pointing: Pointing, mode, seed,
             index, wcs_cards) -> fits.HDUList:
    hdr = fits.Header()
    for card in wcs_cards:
        hdr.append(card)
    hdr.extend([
        ("BUNIT", "electron/s", "pixel unit (sky-subtracted count rate)"),
        ("BAND", band, "Roman WFI filter"),
        ("FILTER", band, "Roman WFI filter"),
        ("EXPTIME", bkg.exptime, "[s] exposure time (galsim.roman.exptime)"),
        ("MAGZP", zp, "[mag] AB magnitude of 1 electron/s"),
        ("SKYLEVEL", bkg.total / bkg.exptime, "[electron/s/pix] subtracted: zodi+thermal+dark"),
        ("SKYZODI", bkg.zodi / bkg.exptime, "[electron/s/pix] zodiacal light"),
        ("SKYTHERM", bkg.thermal / bkg.exptime, "[electron/s/pix] thermal background"),
        ("DARKCUR", bkg.dark / bkg.exptime, "[electron/s/pix] dark current"),
        ("BKGSIG", bkg.sigma, "[electron/s] background noise rms per pixel"),
        ("RDNOISE", bkg.read_noise, "[electron] read noise rms per pixel"),
        ("GAIN", 1.0, "[electron/DN]"),
        ("SCA", pointing.sca, "Roman SCA (1-18)"),
        ("SCAX0", pointing.x0, "[pix] 0-based SCA column of pixel [0, 0]"),
        ("SCAY0", pointing.y0, "[pix] 0-based SCA row of pixel [0, 0]"),
        ("MJD-OBS", mjd, "[d] MJD of the exposure (simulated, fixed)"),
        ("DATE-OBS", render.mjd_to_datetime(mjd).isoformat(), "UTC of the exposure (= MJD-OBS)"),
        ("IMAGE", epoch, "ref or new image of the pair"),
        ("SIMMODE", mode, "rtcnn.sim mode: inject or epochs"),
        ("SEED", seed, "rtcnn.sim data-set seed"),
        ("PAIR", index, "pair index within the data set"),
        ("PSFSCAX", psf.key[2], "[pix] 1-based SCA x of the PSF model"),
        ("PSFSCAY", psf.key[3], "[pix] 1-based SCA y of the PSF model"),
        ("PSFDEFOC", psf.key[4], "[wave] extra defocus (Zernike 4)"),
        ("PSFJITT", psf.key[5], "[mas] Gaussian jitter sigma"),
        ("PSFBOX", render.PSF_BOX, "[pix] side of the PSF model's unit-flux box"),
        ("NCOSMIC", n_cr, "number of cosmic-ray hits added"),
        ("ORIGIN", "rtcnn.sim", "galsim " + galsim.__version__),
    ])
    return fits.HDUList([fits.PrimaryHDU(data=np.ascontiguousarray(data, dtype=np.float32),
                                         header=hdr)])


__all__ = ["simulate_dataset", "simulate_pair", "pair_dir", "check_args", "PAIR_FILES"]
