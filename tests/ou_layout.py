"""Write small OpenUniverse-2024-style (RomanTDS) data sets for tests and demos.

The files follow the layout and conventions of the OpenUniverse 2024 Roman Time Domain
Survey simulations exactly as they are distributed (and as ``roman_imsim`` writes them),
only with small chips:

* ``images/simple_model/{band}/{pointing}/Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz``
  -- HDU 0 header only, HDU 1 ``SCI`` (float32 counts for the whole exposure, gain 1, sky
  NOT subtracted), HDU 2 ``ERR``, HDU 3 ``DQ`` (int32, non-zero = bad), the same header with
  a TAN-SIP WCS (CD matrix, from :func:`galsim.roman.getWCS`) and ``FILTER``, ``EXPTIME``,
  ``MJD-OBS``, ``ZPTMAG`` (= 2.5 log10(EXPTIME * collecting area)), ``SKY_MEAN``, ``SCA_NUM``
  in every HDU.
* ``truth/{band}/{pointing}/Roman_TDS_index_{band}_{pointing}_{sca}.txt`` -- one ``#``
  header line ``object_id ra dec x y realized_flux flux mag obj_type``; ``x, y`` are
  GalSim/FITS 1-based; ``mag = -2.5 log10(flux) + bandpass zeropoint`` (not AB: AB =
  ``mag + ZPTMAG``); rows for objects up to ``EDGE_PIX`` off the chip are included.
* ``Roman_TDS_obseq_test.fits`` -- HDU 1 table ``ra, dec, filter, exptime, date, pa``
  whose row index is the pointing number.

Sources are drawn with the :func:`galsim.roman.getPSF` PSF of the SCA; their photon
counts come from a flat-f_nu SED of the given AB magnitude integrated through the
:func:`galsim.roman.getBandpasses` bandpass (``SED.calculateFlux`` x collecting area x
exposure time), so the reader's AB zero point is checked against GalSim's own photometry.

Run ``python tests/ou_layout.py OUTDIR`` to write a directory big enough to train on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path

import galsim
import galsim.roman
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

WCS_DATE_MJD = 62100.0  # MJD used only to build galsim.roman WCSs (a date Roman can see RA0, DEC0)
RA0, DEC0 = 9.6, -44.0  # deg, field centre (the TDS deep field is near here)
PA0 = 10.0  # deg, position angle of the observatory
EDGE_PIX = 16  # px, truth rows are written for objects this far off the chip (OpenUniverse: 512)
READ_NOISE = 8.5  # e-, Gaussian read noise per pixel (galsim.roman.read_noise)
SKY_RATE = 0.6  # e-/s/pix, sky + thermal background
PUPIL_BIN = 8  # galsim.roman.getPSF pupil binning (fast, accurate enough for tests)
PSF_OVERSAMPLE = 4  # tabulated PSF samples per Roman pixel
PSF_BOX = 8.0  # arcsec, side of the tabulated PSF
STAMP_PSF = 65  # px, postage-stamp size for point sources
STAMP_GAL = 65  # px, postage-stamp size for galaxies
AB_FNU = 3631e-23  # erg/s/cm^2/Hz, the AB reference flux density


@dataclasses.dataclass(frozen=True)
class Pointing:
    """One row of the observation sequence.

    ``dx, dy`` offset the boresight by that many pixels' worth of arcsec along RA and Dec
    (so another pointing's chip sees the sky shifted by roughly that amount).
    """

    band: str
    mjd: float  # MJD of the exposure
    exptime: float  # s
    dx: float = 0.0  # px (0.11"), boresight offset along RA
    dy: float = 0.0  # px, boresight offset along Dec
    pa: float = PA0  # deg

    @property
    def radec(self) -> tuple[float, float]:
        """Boresight (ra, dec) in degrees."""
        scale = galsim.roman.pixel_scale / 3600.0
        return (RA0 + self.dx * scale / np.cos(np.radians(DEC0)), DEC0 + self.dy * scale)


def small_sequence() -> list[Pointing]:
    """The small sequence the unit tests use: two bands, quiet first epochs, one dither."""
    return [
        Pointing("H158", 62100.0, 302.275),  # 0: H158 reference epoch, no transient active
        Pointing("H158", 62110.0, 302.275),  # 1: same grid, transients active
        Pointing("H158", 62115.0, 302.275, dx=6.4, dy=-3.7),  # 2: dithered, transients active
        Pointing("J129", 62100.5, 302.275),  # 3: J129 reference epoch
        Pointing("J129", 62112.0, 302.275, dx=-5.2, dy=2.9),  # 4: dithered, transients active
    ]


@dataclasses.dataclass
class Scene:
    """Objects on the sky. ``kind`` in {star, galaxy, transient}; mags are AB."""

    ids: np.ndarray  # int64
    ra: np.ndarray  # deg
    dec: np.ndarray  # deg
    mag: np.ndarray  # AB mag (transients: at peak)
    kind: np.ndarray  # str
    hlr: np.ndarray  # arcsec, galaxy half-light radius (0 for point sources)
    t_start: np.ndarray  # MJD, transient active window start (-inf for static objects)
    t_end: np.ndarray  # MJD, transient active window end (+inf for static objects)

    def mag_at(self, mjd: float) -> np.ndarray:
        """AB magnitude of every object at ``mjd`` (NaN where a transient is inactive)."""
        mag = self.mag.copy()
        tr = self.kind == "transient"
        active = (mjd >= self.t_start) & (mjd <= self.t_end)
        t_peak = self.t_start[tr] + 0.3 * (self.t_end[tr] - self.t_start[tr])
        # linear-in-mag light curve: 0.04 mag/day rise before peak, 0.03 mag/day decline
        rise = np.where(mjd < t_peak, 0.04 * (t_peak - mjd), 0.03 * (mjd - t_peak))
        mag[tr] = np.where(active[tr], self.mag[tr] + rise, np.nan)
        return mag

    def as_table(self) -> Table:
        """The scene as an astropy Table (for inspection)."""
        return Table(dataclasses.asdict(self))


def make_scene(
    centre: tuple[float, float],
    n_stars: int,
    n_galaxies: int,
    n_transients: int,
    radius_px: float,
    seed: int,
    window: tuple[float, float] = (62105.0, 62150.0),
    star_mags: tuple[float, float] = (18.0, 22.0),
    transient_mags: tuple[float, float] = (19.0, 22.5),
) -> Scene:
    """Random stars, exponential galaxies and transients within ``radius_px`` of ``centre``.

    ``centre`` is (ra, dec) in degrees.

    Half of the transients (rounded down) sit 0.3" from a galaxy (a host); the rest are
    hostless. Every transient is active from ``window[0]`` to ``window[1]`` (MJD).
    """
    rng = np.random.default_rng(seed)
    scale = galsim.roman.pixel_scale / 3600.0  # deg/px
    n = n_stars + n_galaxies + n_transients
    dx = rng.uniform(-radius_px, radius_px, n)
    dy = rng.uniform(-radius_px, radius_px, n)
    kind = np.array(["star"] * n_stars + ["galaxy"] * n_galaxies + ["transient"] * n_transients)
    mag = np.concatenate([
        rng.uniform(*star_mags, n_stars),
        rng.uniform(19.5, 22.0, n_galaxies),
        rng.uniform(*transient_mags, n_transients),
    ])
    hlr = np.where(kind == "galaxy", rng.uniform(0.2, 0.5, n), 0.0)
    gal = np.flatnonzero(kind == "galaxy")
    tr = np.flatnonzero(kind == "transient")
    for k, i in enumerate(tr[: min(len(gal), len(tr) // 2)]):  # hosted transients
        ang = rng.uniform(0, 2 * np.pi)
        dx[i] = dx[gal[k]] + 0.3 / 0.11 * np.cos(ang)
        dy[i] = dy[gal[k]] + 0.3 / 0.11 * np.sin(ang)
    t_start = np.where(kind == "transient", window[0], -np.inf)
    t_end = np.where(kind == "transient", window[1], np.inf)
    return Scene(
        ids=np.arange(1, n + 1, dtype=np.int64) + 10_000_000,
        ra=centre[0] + dx * scale / np.cos(np.radians(centre[1])),
        dec=centre[1] + dy * scale,
        mag=mag, kind=kind, hlr=hlr, t_start=t_start, t_end=t_end,
    )


@functools.lru_cache(maxsize=None)
def _bandpass(band: str) -> galsim.Bandpass:
    return galsim.roman.getBandpasses(AB_zeropoint=True)[band]


@functools.lru_cache(maxsize=None)
def roman_psf(sca: int, band: str) -> galsim.InterpolatedImage:
    """The galsim.roman PSF at the SCA centre, tabulated once (drawing it is then fast).

    Achromatic (at the bandpass effective wavelength), flux 1, tabulated at
    ``PSF_OVERSAMPLE`` x the Roman pixel scale over ``PSF_BOX`` arcsec.
    """
    bp = _bandpass(band)
    centre = galsim.PositionD(galsim.roman.n_pix / 2, galsim.roman.n_pix / 2)
    psf = galsim.roman.getPSF(sca, band, SCA_pos=centre, pupil_bin=PUPIL_BIN,
                              wavelength=bp.effective_wavelength)
    scale = galsim.roman.pixel_scale / PSF_OVERSAMPLE
    n = int(PSF_BOX / scale)
    tab = psf.drawImage(nx=n, ny=n, scale=scale, method="no_pixel")
    return galsim.InterpolatedImage(tab, x_interpolant="lanczos5", normalization="flux")


def photon_counts(mag_ab: np.ndarray, band: str, exptime: float) -> np.ndarray:
    """Expected photons for AB mags: flat-f_nu SED through the bandpass x area x time."""
    bp = _bandpass(band)
    unit = galsim.SED(lambda w: AB_FNU, wave_type="nm", flux_type="fnu").calculateFlux(bp)
    return unit * 10 ** (-0.4 * np.asarray(mag_ab)) * galsim.roman.collecting_area * exptime


def chip_wcs(p: Pointing, sca: int, size: int) -> galsim.GSFitsWCS:
    """TAN-SIP WCS of the central ``size`` x ``size`` pixels of an SCA, origin (1, 1)."""
    ra, dec = p.radec
    full = galsim.roman.getWCS(
        world_pos=galsim.CelestialCoord(ra * galsim.degrees, dec * galsim.degrees),
        PA=p.pa * galsim.degrees, date=Time(WCS_DATE_MJD, format="mjd").datetime,
        SCAs=[sca])[sca]
    x0 = galsim.roman.n_pix // 2 - size // 2
    im = galsim.ImageF(galsim.BoundsI(x0 + 1, x0 + size, x0 + 1, x0 + size), wcs=full)
    im.setOrigin(1, 1)  # galsim shifts the WCS so that sky positions are unchanged
    return im.wcs


def _draw(image: galsim.ImageF, obj: galsim.GSObject, pos: galsim.PositionD, stamp: int):
    b = galsim.BoundsI(int(pos.x) - stamp // 2, int(pos.x) + stamp // 2,
                       int(pos.y) - stamp // 2, int(pos.y) + stamp // 2)
    b = b & image.bounds
    if b.isDefined():
        obj.drawImage(image=image[b], center=pos, add_to_image=True)


def write_exposure(
    root: Path, pointing_id: int, p: Pointing, sca: int, scene: Scene, size: int,
    rng: np.random.Generator,
) -> tuple[Path, Path]:
    """Render one SCA of one pointing and write its image and truth files."""
    band = p.band
    wcs = chip_wcs(p, sca, size)
    psf = roman_psf(sca, band)
    zptmag = 2.5 * np.log10(p.exptime * galsim.roman.collecting_area)
    zp_bp = _bandpass(band).zeropoint
    mag = scene.mag_at(p.mjd)
    gsrng = galsim.BaseDeviate(int(rng.integers(1 << 30)))

    image = galsim.ImageF(size, size, wcs=wcs)  # origin (1, 1): GalSim/FITS pixels
    rows = []
    for i in np.flatnonzero(np.isfinite(mag)):
        coord = galsim.CelestialCoord(scene.ra[i] * galsim.degrees, scene.dec[i] * galsim.degrees)
        pos = wcs.toImage(coord)
        lo, hi = 1 - EDGE_PIX, size + EDGE_PIX
        if not (lo <= pos.x <= hi and lo <= pos.y <= hi):
            continue
        flux = float(photon_counts(mag[i], band, p.exptime))
        realized = float(galsim.PoissonDeviate(gsrng, mean=flux)())
        if realized <= 0:
            continue
        if scene.kind[i] == "galaxy":
            obj = galsim.Convolve(galsim.Exponential(half_light_radius=scene.hlr[i]), psf)
            stamp = STAMP_GAL
        else:
            obj, stamp = psf, STAMP_PSF
        _draw(image, obj.withFlux(realized), pos, stamp)
        rows.append((scene.ids[i], scene.ra[i], scene.dec[i], pos.x, pos.y, realized, flux,
                     -2.5 * np.log10(flux) + zp_bp, scene.kind[i]))

    sky = SKY_RATE * p.exptime  # e- per pixel
    image += sky
    image.addNoise(galsim.PoissonNoise(gsrng))
    image.addNoise(galsim.GaussianNoise(gsrng, sigma=READ_NOISE))
    sci = image.array.astype(np.float32)
    err = np.full_like(sci, np.sqrt(sky + READ_NOISE**2))
    dq = np.zeros(sci.shape, dtype=np.int32)
    hot = rng.integers(0, size, (3, 2))
    dq[hot[:, 1], hot[:, 0]] = 2  # hot pixel (roman_imsim DQ bit 0x2)
    sci[hot[:, 1], hot[:, 0]] += 5.0e4

    hdr = fits.Header()
    gs_hdr = galsim.FitsHeader()
    wcs.writeToFitsHeader(gs_hdr, image.bounds)
    for key in gs_hdr.keys():
        if not key.startswith("GS_"):
            hdr[key] = gs_hdr[key]
    ra, dec = p.radec
    hdr["RA_TARG"] = (ra, "boresight RA (deg)")
    hdr["DEC_TARG"] = (dec, "boresight Dec (deg)")
    hdr["PA_OBSY"] = (p.pa, "position angle (deg)")
    hdr["EXPTIME"] = p.exptime
    hdr["MJD-OBS"] = p.mjd
    hdr["DATE-OBS"] = Time(p.mjd, format="mjd").isot
    hdr["FILTER"] = band
    hdr["ZPTMAG"] = zptmag
    hdr["SCA_NUM"] = sca
    hdr["SKY_MEAN"] = sky
    hdus = fits.HDUList([
        fits.PrimaryHDU(header=hdr),
        fits.ImageHDU(sci, header=hdr, name="SCI", ver=1),
        fits.ImageHDU(err, header=hdr, name="ERR", ver=1),
        fits.ImageHDU(dq, header=hdr, name="DQ", ver=1),
    ])
    stem = f"{band}_{pointing_id}_{sca}"
    img_path = (root / "images" / "simple_model" / band / str(pointing_id)
                / f"Roman_TDS_simple_model_{stem}.fits.gz")
    img_path.parent.mkdir(parents=True, exist_ok=True)
    hdus.writeto(img_path, overwrite=True)

    truth_path = root / "truth" / band / str(pointing_id) / f"Roman_TDS_index_{stem}.txt"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    with open(truth_path, "w") as fh:
        fh.write("# object_id ra dec x y realized_flux flux mag obj_type\n")
        for r in rows:
            fh.write(f"{r[0]} {r[1]:.10f} {r[2]:.10f} {r[3]:.6f} {r[4]:.6f} "
                     f"{r[5]:.1f} {r[6]:.6f} {r[7]:.6f} {r[8]}\n")
    return img_path, truth_path


def write_obseq(path: Path, pointings: list[Pointing]) -> Path:
    """The observation sequence: HDU 1 table, row index = pointing number."""
    radec = np.array([p.radec for p in pointings])
    t = Table({
        "ra": radec[:, 0], "dec": radec[:, 1],
        "filter": np.array([p.band for p in pointings]),
        "exptime": np.array([p.exptime for p in pointings]),
        "date": np.array([p.mjd for p in pointings]),
        "pa": np.array([p.pa for p in pointings]),
    })
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t)]).writeto(path, overwrite=True)
    return path


def make_ou_directory(
    root: str | os.PathLike,
    pointings: list[Pointing] | None = None,
    scas: tuple[int, ...] = (3,),
    size: int = 96,
    n_stars: int = 10,
    n_galaxies: int = 2,
    n_transients: int = 3,
    seed: int = 0,
    window: tuple[float, float] = (62105.0, 62150.0),
) -> Scene:
    """Write a complete small OpenUniverse-layout directory and return its scene.

    Parameters
    ----------
    root : path
        Output directory (created).
    pointings : list of Pointing, optional
        The observation sequence (default :func:`small_sequence`).
    scas : tuple of int
        SCAs to render for every pointing.
    size : int
        Chip size in pixels (square; OpenUniverse chips are 4088).
    n_stars, n_galaxies, n_transients : int
        Objects in the scene, spread over the chip.
    seed : int
        Random seed (scene, noise).
    window : (float, float)
        MJD range in which every transient is active (present in the truth).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pointings = small_sequence() if pointings is None else pointings
    scenes = []
    for k, sca in enumerate(scas):  # objects around the chip centre of the first pointing
        mid = galsim.PositionD((size + 1) / 2, (size + 1) / 2)
        c = chip_wcs(pointings[0], sca, size).toWorld(mid)
        sc = make_scene((c.ra.deg, c.dec.deg), n_stars, n_galaxies, n_transients, 0.42 * size,
                        seed + 1000 * k, window)
        sc.ids += 1_000_000 * k
        scenes.append(sc)
    scene = Scene(*(np.concatenate([getattr(sc, f.name) for sc in scenes])
                    for f in dataclasses.fields(Scene)))
    rng = np.random.default_rng(seed + 1)
    write_obseq(root / "Roman_TDS_obseq_test.fits", pointings)
    for pid, p in enumerate(pointings):
        for sca in scas:
            write_exposure(root, pid, p, sca, scene, size, rng)
    return scene


def training_pointings(n_epochs: int, bands: tuple[str, ...], seed: int) -> list[Pointing]:
    """Per band: one quiet reference epoch, then ``n_epochs - 1`` dithered epochs."""
    rng = np.random.default_rng(seed)
    out = []
    for b, band in enumerate(bands):
        out.append(Pointing(band, 62100.0 + 0.1 * b, 302.275))
        for k in range(1, n_epochs):
            dx, dy = rng.uniform(-8, 8, 2)
            out.append(Pointing(band, 62106.0 + 4.0 * k + 0.1 * b, 302.275, dx=dx, dy=dy))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: write a directory big enough for ``python -m rtcnn.train data=openuniverse``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--size", type=int, default=256, help="chip size in px")
    ap.add_argument("--epochs", type=int, default=5, help="pointings per band")
    ap.add_argument("--bands", default="H158", help="comma-separated bands")
    ap.add_argument("--scas", default="3", help="comma-separated SCA numbers")
    ap.add_argument("--stars", type=int, default=60)
    ap.add_argument("--galaxies", type=int, default=20)
    ap.add_argument("--transients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    bands = tuple(b.strip() for b in a.bands.split(","))
    pts = training_pointings(a.epochs, bands, a.seed)
    make_ou_directory(a.outdir, pts, tuple(int(s) for s in a.scas.split(",")), a.size,
                      a.stars, a.galaxies, a.transients, a.seed)
    print(f"wrote {len(pts) * len(a.scas.split(','))} exposures to {a.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
