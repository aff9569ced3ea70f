"""Survey geometry: exposures at other rolls and pointings, and reference coadds.

Modes (``python -m rtcnn.sim OUTDIR --mode survey|dither``; :func:`simulate_survey_pair`)
-----------------------------------------------------------------------------------------
``survey``
    The new image is one exposure (as in ``epochs`` mode: its own noise, cosmic rays, a
    new-epoch PSF with extra defocus and jitter) of a ``size x size`` cut-out of one SCA.
    The reference is a **coadd** (:mod:`rtcnn.coadd`) of ``n_epochs`` earlier exposures
    (default 6), each at a random roll angle (PA uniform in 0-360 deg) and a random dither
    (its centre within ``+-dither_px`` px of the new image's centre, default 20), each
    with its own noise, cosmic rays, PSF jitter and PSF position. An exposure is a
    cut-out of the same SCA, ``L = ceil(size sqrt 2) + 2 dither + 4`` px on a side (so it
    covers the new image at any roll), centred on the new cut-out's SCA position as far
    as the SCA allows. The coadd is on a **north-up** TAN grid (``ceil(size sqrt 2) + 2``
    px, centred on the new image): another size, origin and orientation than the new
    image, as a survey's sky-tile references are. ``ref.fits`` carries the coadd and its
    ``VAR``, ``NEXP``, ``WHT`` planes.
``dither``
    Two single exposures of ``size x size`` px at different rolls and pointings (dither up
    to ``dither_px``), no coadd: the new image's corners that the reference does not
    cover are masked when the pair is aligned.

Geometry and physics
--------------------
* Every exposure has a real Roman TAN-SIP WCS (``galsim.roman.getWCS`` through
  :func:`rtcnn.sim.render.cutout_wcs`) at its own PA; its boresight is solved (a few
  fixed-point steps on the sky) so that the cut-out centre lands on the dithered target.
* The scene is drawn in the new image's pixel frame over a square that holds every
  exposure (objects outside the new image exist too), and mapped into each exposure
  through the two WCSs: points by position; galaxies by position *and* the local
  Jacobian of the map (:func:`rtcnn.sim.render.draw_galaxies`), so a galaxy has the same
  shape on the sky in every exposure. The PSF is fixed to the detector (it is drawn
  unrotated in each exposure's pixels), so on the sky it rotates with the roll.
* Truth (``truth.ecsv``, ``sources.ecsv``) is in the new image's grid: the objects inside
  it. ``snr`` uses ``sigma_diff = hypot(sigma_new, sigma_ref / sqrt(n_epochs))``
  (``dither``: ``hypot(sigma_new, sigma_ref)``), the background noise of the difference
  before resampling.

The same seed gives byte-identical files (the coadd's combination is deterministic).
Imports :mod:`rtcnn.coadd` (which sits below the simulator in DESIGN.md's list): the
reference coadd is built by the same code a user runs, not a second copy of it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import galsim
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from rtcnn.roman import SCA_NPIX
from rtcnn.sim import render
from rtcnn.sim.scene import Pointing, Scene, draw_pointing, make_scene, pair_band

__all__ = [
    "BOUNDS_MARGIN",
    "EPOCH_SPACING_DAYS",
    "exposure_wcs",
    "frame_positions",
    "simulate_survey_pair",
]

EPOCH_SPACING_DAYS = 10.0  # d, between consecutive reference exposures (before mjd)
BOUNDS_MARGIN = 70  # px, objects this far outside a frame are still drawn (PSF wings)
BORESIGHT_ITERATIONS = 6  # fixed-point steps placing a cut-out centre on its target
JACOBIAN_STEP = 0.5  # px, finite-difference step of the galaxy Jacobians


def astropy_wcs(wcs: galsim.GSFitsWCS, size: int) -> WCS:
    """The astropy (0-based) WCS of a GalSim cut-out WCS, through its FITS cards."""
    hdr = fits.Header([fits.Card(k, v, c) for k, v, c in render.wcs_header_cards(wcs, size)])
    hdr["NAXIS"], hdr["NAXIS1"], hdr["NAXIS2"] = 2, size, size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(hdr).celestial


def exposure_wcs(target: galsim.CelestialCoord, pa: float, sca: int, x0: int, y0: int,
                 size: int, mjd: float) -> tuple[galsim.GSFitsWCS, Pointing]:
    """WCS of a ``size`` px cut-out at SCA origin ``(x0, y0)`` whose centre is ``target``.

    The boresight is moved by the sky offset between the cut-out centre and ``target``
    until they agree (:data:`BORESIGHT_ITERATIONS` steps; ~1e-9 deg).
    """
    centre = galsim.PositionD((size + 1) / 2.0, (size + 1) / 2.0)  # GalSim 1-based
    bore = target
    for _ in range(BORESIGHT_ITERATIONS):
        pointing = Pointing(bore.ra / galsim.degrees % 360.0, bore.dec / galsim.degrees, pa,
                            sca, x0, y0)
        wcs = render.cutout_wcs(pointing, mjd)
        here = wcs.toWorld(centre)
        u, v = here.project(target)
        bore = bore.deproject(u, v)
    pointing = Pointing(bore.ra / galsim.degrees % 360.0, bore.dec / galsim.degrees, pa, sca,
                        x0, y0)
    return render.cutout_wcs(pointing, mjd), pointing


def frame_positions(new_wcs: galsim.GSFitsWCS, frame: WCS, x, y, jacobian: bool = False):
    """Positions (0-based px) in ``frame`` of new-image positions ``(x, y)``.

    Returns ``(fx, fy)``, or ``(fx, fy, J)`` with ``J`` ``(n, 2, 2)`` the derivative
    ``d(fx, fy) / d(x, y)`` (central differences of :data:`JACOBIAN_STEP` px).
    """
    def to_frame(px, py):
        ra, dec = render.pixel_to_radec(new_wcs, px, py)
        fx, fy = frame.all_world2pix(ra, dec, 0)
        return np.asarray(fx, float), np.asarray(fy, float)

    x, y = np.asarray(x, float), np.asarray(y, float)
    fx, fy = to_frame(x, y)
    if not jacobian:
        return fx, fy
    h = JACOBIAN_STEP
    jac = np.empty((x.size, 2, 2))
    for col, (dx, dy) in enumerate(((h, 0.0), (0.0, h))):
        ax, ay = to_frame(x + dx, y + dy)
        bx, by = to_frame(x - dx, y - dy)
        jac[:, 0, col] = (ax - bx) / (2 * h)
        jac[:, 1, col] = (ay - by) / (2 * h)
    return fx, fy, jac


def render_frame(size: int, psf: render.PsfModel, scene: Scene, mag, zp: float, fx, fy,
                 jac) -> np.ndarray:
    """Noise-free exposure (e-/s, ``(size, size) float32``) of the scene at frame positions.

    Like :func:`rtcnn.sim.render.render_static` (galaxies, then point sources), with each
    object at ``(fx, fy)`` and each galaxy mapped by its Jacobian ``jac``.
    """
    image = render.new_image(size)
    flux = render.mag_to_flux(mag, zp)
    m = BOUNDS_MARGIN
    inside = (fx > -m) & (fx < size - 1 + m) & (fy > -m) & (fy < size - 1 + m) & (flux > 0)
    is_gal = scene.select(("galaxy",))
    gal = np.flatnonzero(is_gal & inside)
    pts = np.flatnonzero(~is_gal & inside)
    render.draw_galaxies(image, psf, scene, gal, flux[gal], xy=np.column_stack([fx[gal],
                         fy[gal]]), jacobian=jac[gal])  # fmt: skip
    render.draw_points(image, psf, fx[pts], fy[pts], flux[pts])
    return image.array


def _subset(scene: Scene, keep: np.ndarray) -> Scene:
    return Scene(**{f.name: getattr(scene, f.name)[keep] for f in dataclasses.fields(Scene)})


def _shift_forced(params: dict, pad: float) -> dict:
    p = dict(params)
    for key in ("forced_stars", "forced_transients"):
        p[key] = [[x + pad, y + pad, mag] for x, y, mag in params[key]]
    return p


def simulate_survey_pair(index: int, size: int, mode: str, seed: int, params: dict) -> dict:
    """Simulate pair ``index`` of a ``survey`` or ``dither`` data set in memory.

    Returns
    -------
    dict
        ``{"ref.fits": HDUList, "new.fits": HDUList, "truth.ecsv": Table,
        "sources.ecsv": Table, "params.json": dict}`` (as
        :func:`rtcnn.sim.dataset.simulate_pair`).
    """
    from rtcnn.coadd import coadd_images, north_up_grid
    from rtcnn.io.fits import Image
    from rtcnn.sim.dataset import SNR_DOC, _bkg_dict, _hdulist, _sources_table, _truth_table

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    band = pair_band(params, seed, index)
    zp = render.magzp(band)
    survey = mode == "survey"
    n_ref = params["n_epochs"] if survey else 1
    dither = params["dither_px"]
    pointing = draw_pointing(rng, size, params)
    frame = (min(SCA_NPIX, math.ceil(size * math.sqrt(2)) + 2 * math.ceil(dither) + 4)
             if survey else size)
    # the scene: a square in the new image's frame that holds every exposure at any roll
    reach = frame / math.sqrt(2) + dither + BOUNDS_MARGIN / 2
    side = math.ceil(2 * reach)
    pad = (side - size) / 2.0
    scene = make_scene(rng, side, _shift_forced(params, pad))
    scene.x, scene.y = scene.x - pad, scene.y - pad
    mjd_new = params["mjd"] + params["cadence_days"]
    new_wcs = render.cutout_wcs(pointing, mjd_new)
    sca = pointing.sca

    # the new exposure (as epochs mode: defocus + jitter, own background, cosmic rays)
    sx, sy = render.psf_position(pointing, size)
    jit_new = render.quantise(rng.uniform(*params["psf_jitter"]), render.JITTER_STEP)
    defocus = render.quantise(rng.uniform(-params["psf_defocus"], params["psf_defocus"]),
                              render.DEFOCUS_STEP)
    psf_new = render.psf_model(band, sca, sx, sy, defocus, jit_new, params["pupil_bin"])
    bkg_new = render.background(band, new_wcs, size, mjd_new)
    new = render.add_exposure_noise(render.render_static(size, psf_new, scene, scene.mag_new, zp),
                                    bkg_new, rng)
    cr = (params["cosmic_ray_density"], params["cosmic_ray_energy"], params["cosmic_ray_length"],
          bkg_new.exptime)
    n_cr_new = render.add_cosmic_rays(new, rng, *cr)

    # the reference exposures: other rolls, dithers, PSF jitter, noise and cosmic rays
    cx = cy = (size - 1) / 2.0  # new image centre, 0-based
    ex0 = int(np.clip(pointing.x0 + size / 2 - frame / 2, 0, SCA_NPIX - frame))
    ey0 = int(np.clip(pointing.y0 + size / 2 - frame / 2, 0, SCA_NPIX - frame))
    epochs, info = [], []
    for k in range(n_ref):
        pa = float(rng.uniform(0.0, 360.0))
        d = rng.uniform(-dither, dither, size=2)
        mjd = params["mjd"] - EPOCH_SPACING_DAYS * (n_ref - 1 - k)
        target = new_wcs.toWorld(galsim.PositionD(cx + d[0] + render.GALSIM_ORIGIN,
                                                  cy + d[1] + render.GALSIM_ORIGIN))
        wcs_k, point_k = exposure_wcs(target, pa, sca, ex0, ey0, frame, mjd)
        aw = astropy_wcs(wcs_k, frame)
        fx, fy, jac = frame_positions(new_wcs, aw, scene.x, scene.y, jacobian=True)
        px, py = render.psf_position(point_k, frame)
        jit = render.quantise(rng.uniform(*params["psf_jitter"]), render.JITTER_STEP)
        psf_k = render.psf_model(band, sca, px, py, 0.0, jit, params["pupil_bin"])
        bkg_k = render.background(band, wcs_k, frame, mjd)
        img = render.add_exposure_noise(render_frame(frame, psf_k, scene, scene.mag_ref, zp,
                                                     fx, fy, jac), bkg_k, rng)
        n_cr = render.add_cosmic_rays(img, rng, *cr)
        epochs.append((img, aw, wcs_k, point_k, psf_k, bkg_k, mjd, n_cr))
        info.append({"pa": pa, "dither_px": [float(d[0]), float(d[1])], "mjd": mjd,
                     "boresight": [point_k.ra, point_k.dec], "sca_x0": ex0, "sca_y0": ey0,
                     "size": frame, "psf_sca_pos": [px, py], "jitter_mas": jit,
                     "cosmic_rays": n_cr, "background_e": _bkg_dict(bkg_k)})  # fmt: skip
    bkg_ref = epochs[0][5]

    common = {"band": band, "zp": zp, "mode": mode, "seed": seed, "index": index}
    if survey:
        new_img = Image.from_array(new, wcs=astropy_wcs(new_wcs, size), zeropoint=zp)
        grid, grid_shape = north_up_grid(new_img, math.ceil(size * math.sqrt(2)) + 2)
        coadd = coadd_images(
            (Image.from_array(e[0], wcs=e[1], zeropoint=zp, exptime=e[5].exptime, band=band)
             for e in epochs), grid, grid_shape, count=n_ref)
        sigma_ref = bkg_ref.sigma / math.sqrt(n_ref)
        ref_hdul = _hdulist(coadd.data, bkg=bkg_ref, mjd=epochs[-1][6], epoch="ref",
                            psf=epochs[0][4], n_cr=sum(e[7] for e in epochs),
                            pointing=epochs[0][3],
                            wcs_cards=[(c.keyword, c.value, c.comment)
                                       for c in grid.to_header().cards], **common)
        hdr = ref_hdul[0].header
        hdr["EXPTIME"] = (coadd.exptime, "[s] sum of the exposure times")
        hdr["BKGSIG"] = (sigma_ref, "[electron/s] background rms per pixel, coadd")
        hdr["NCOMBINE"] = (n_ref, "exposures in the coadd (rtcnn.coadd)")
        hdr["NREJECT"] = (coadd.n_rejected, "pixel values rejected as outliers")
        hdr.insert("NAXIS2", ("EXTEND", True, "VAR, NEXP, WHT follow"), after=True)
        for key in ("SCAX0", "SCAY0"):
            hdr.remove(key, ignore_missing=True)
        wcs_hdr = grid.to_header()
        ref_hdul.extend([fits.ImageHDU(coadd.variance, header=wcs_hdr, name="VAR"),
                         fits.ImageHDU(coadd.nexp, header=wcs_hdr, name="NEXP"),
                         fits.ImageHDU(coadd.weight, header=wcs_hdr, name="WHT")])
    else:
        img, aw, wcs_k, point_k, psf_k, bkg_k, mjd, n_cr = epochs[0]
        sigma_ref = bkg_k.sigma
        ref_hdul = _hdulist(img, bkg=bkg_k, mjd=mjd, epoch="ref", psf=psf_k, n_cr=n_cr,
                            pointing=point_k, wcs_cards=render.wcs_header_cards(wcs_k, frame),
                            **common)
    sigma_diff = float(math.hypot(bkg_new.sigma, sigma_ref))
    new_hdul = _hdulist(new, bkg=bkg_new, mjd=mjd_new, epoch="new", psf=psf_new, n_cr=n_cr_new,
                        pointing=pointing, wcs_cards=render.wcs_header_cards(new_wcs, size),
                        **common)

    # truth in the new image's grid: the objects inside it
    lim = (-0.5, size - 0.5)
    keep = (scene.x >= lim[0]) & (scene.x < lim[1]) & (scene.y >= lim[0]) & (scene.y < lim[1])
    inside = _subset(scene, keep)
    ra, dec = render.pixel_to_radec(new_wcs, inside.x, inside.y)
    sources = _sources_table(inside, ra, dec)
    truth = _truth_table(inside, ra, dec, zp, psf_new, sigma_diff)
    meta = {"band": band, "magzp": zp, "mode": mode, "seed": seed, "pair": index, "size": size,
            "exptime": bkg_new.exptime, "sigma_diff": sigma_diff, "snr": SNR_DOC,
            "n_epochs": n_ref}  # fmt: skip
    truth.meta.update(meta)
    sources.meta.update(meta)
    pair_params = {
        "pair": index, "seed": seed, "mode": mode, "size": size, "band": band, "scene": params,
        "pointing": {"ra": pointing.ra, "dec": pointing.dec, "pa": pointing.pa, "sca": sca,
                     "x0": pointing.x0, "y0": pointing.y0},
        "psf_new": {"sca_pos": [sx, sy], "defocus_waves": defocus, "jitter_mas": jit_new},
        "reference": {"kind": "coadd" if survey else "exposure", "epochs": info,
                      "coadd_size": int(ref_hdul[0].data.shape[0])},
        "magzp": zp, "exptime": bkg_new.exptime, "mjd_new": mjd_new,
        "background_e": {"new": _bkg_dict(bkg_new)}, "sigma_diff": sigma_diff,
        "cosmic_rays": {"new": n_cr_new, "ref": [e[7] for e in epochs]},
        "counts": {k: int(np.sum(inside.kind == k)) for k in ("star", "variable", "galaxy",
                                                             "transient")},
        "galsim_version": galsim.__version__,
    }  # fmt: skip
    return {"ref.fits": ref_hdul, "new.fits": new_hdul, "truth.ecsv": truth,
            "sources.ecsv": sources, "params.json": pair_params}
