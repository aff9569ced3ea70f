"""Rendering with ``galsim.roman``: PSF models, WCS, backgrounds, noise, drawing.

Everything here works in the cut-out's pixel frame: GalSim images have bounds
``1..size`` (GalSim is 1-based) and a plain ``0.11"/px`` pixel scale, so a
package position ``(x, y)`` (0-based, :mod:`rtcnn`) is drawn at the GalSim
position ``(x + 1, y + 1)`` -- the one place where the +1 happens
(:data:`GALSIM_ORIGIN`). The Roman PSF returned by ``getPSF`` is in SCA pixel
coordinates, which is exactly this frame, so no WCS is involved in drawing; the
real TAN-SIP WCS (``getWCS``) is used only to give sky positions and the header.

PSF model
---------
``rtcnn.roman.get_psf(band, sca, SCA_pos, defocus, pupil_bin)`` (``galsim.roman.getPSF``):
an achromatic optical PSF at the band's effective wavelength (no SED dependence),
evaluated at the cut-out centre snapped to a 512 px grid on the SCA, optionally
with extra defocus (Zernike 4, waves) and Gaussian pointing jitter. It is drawn
once, 4x oversampled, in a box of :data:`PSF_BOX` native px, and kept as a
``galsim.InterpolatedImage`` normalised to unit flux *in that box* (the ~2.4 %
of light beyond 3.5" is not modelled). Point sources are drawn from the effective
PSF (optical x pixel) with ``method='no_pixel'``; galaxies are convolved with the
optical PSF (box :data:`GAL_PSF_BOX`) and drawn with the pixel response. Models
are cached with :func:`functools.lru_cache` (one build ~0.2 s).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math

import galsim
import galsim.roman as roman
import numpy as np

from rtcnn.roman import GALSIM_ORIGIN, PIXEL_SCALE, bandpass, get_psf, magzp  # noqa: F401
from rtcnn.sim.scene import Pointing, Scene

OVERSAMPLE = 4  # PSF model sampling, model px per native px
PSF_BOX = 64  # native px, side of the point-source PSF model (unit flux inside)
GAL_PSF_BOX = 32  # native px, side of the optical PSF convolved with galaxies
POINT_HALF = 33  # native px, half side of a point-source stamp (covers PSF_BOX + kernel)
PSF_GRID = 512  # SCA px, the PSF is evaluated at the cut-out centre snapped to this grid
DEFOCUS_STEP = 0.01  # waves, quantisation of the extra defocus (cache key)
JITTER_STEP = 1.0  # mas, quantisation of the jitter sigma (cache key)
MJD_UNIX_EPOCH = 40587.0  # MJD of 1970-01-01T00:00:00 UTC
HEADER_DROP = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BZERO", "BSCALE", "GS_XMIN", "GS_YMIN",
               "GS_WCS")  # keys of GalSim's WCS header that astropy writes itself or we drop


def mag_to_flux(mag: np.ndarray, zp: float) -> np.ndarray:
    """``flux = 10**(-0.4 (mag - zp))``; e-/s for ``zp = magzp(band)``; NaN -> 0."""
    flux = 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - zp))
    return np.where(np.isfinite(flux), flux, 0.0)


def mjd_to_datetime(mjd: float) -> datetime.datetime:
    """UTC ``datetime`` of a Modified Julian Date (for GalSim's ``date`` arguments)."""
    epoch = datetime.datetime(1970, 1, 1)
    return epoch + datetime.timedelta(days=float(mjd) - MJD_UNIX_EPOCH)


@dataclasses.dataclass(frozen=True)
class PsfModel:
    """A cached Roman PSF: the objects to draw with and the oversampled arrays.

    Attributes
    ----------
    point : galsim.InterpolatedImage
        Effective PSF (optical x pixel), unit flux; draw with ``method='no_pixel'``.
    optical : galsim.InterpolatedImage
        Optical PSF without the pixel (box :data:`GAL_PSF_BOX`), for convolutions.
    epsf : numpy.ndarray
        ``(PSF_BOX*OVERSAMPLE, PSF_BOX*OVERSAMPLE) float64``, the effective PSF
        sampled every ``1/OVERSAMPLE`` px, centred at the array's centre
        ``((n - 1) / 2, (n - 1) / 2)``, summing to ``OVERSAMPLE**2`` (unit flux per
        native pixel -- the normalisation ``photutils.psf.ImagePSF`` expects).
    key : tuple
        ``(band, sca, sca_x, sca_y, defocus, jitter)`` (SCA px 1-based, waves, mas).
    """

    point: galsim.InterpolatedImage
    optical: galsim.InterpolatedImage
    epsf: np.ndarray
    key: tuple


def psf_position(pointing: Pointing, size: int) -> tuple[float, float]:
    """SCA position (GalSim 1-based px) where a cut-out's PSF is evaluated: its centre
    snapped to the :data:`PSF_GRID` grid."""
    out = []
    for origin in (pointing.x0, pointing.y0):
        centre = origin + 0.5 * size  # 0-based SCA px
        out.append((math.floor(centre / PSF_GRID) + 0.5) * PSF_GRID + GALSIM_ORIGIN)
    return out[0], out[1]


def quantise(value: float, step: float) -> float:
    """``value`` rounded to a multiple of ``step`` (keeps the PSF cache small)."""
    return round(round(value / step) * step, 6)


@functools.lru_cache(maxsize=64)
def psf_model(
    band: str,
    sca: int,
    sca_x: float,
    sca_y: float,
    defocus: float = 0.0,
    jitter: float = 0.0,
    pupil_bin: int = 8,
) -> PsfModel:
    """Build (once; cached) the Roman PSF at one SCA position.

    Parameters
    ----------
    band : str
        Roman filter, e.g. ``'H158'``.
    sca : int
        Detector 1..18.
    sca_x, sca_y : float
        SCA position, GalSim 1-based px.
    defocus : float
        Extra Zernike-4 aberration, waves at 1293 nm (GalSim's convention).
    jitter : float
        Gaussian pointing jitter sigma, mas (0 = none).
    pupil_bin : int
        Pupil-plane binning of ``getPSF`` (8: ~0.05 s per build, adequate here).

    Returns
    -------
    PsfModel
    """
    optical = get_psf(band, sca, (sca_x, sca_y), defocus, pupil_bin)
    if jitter > 0:
        optical = galsim.Convolve(optical, galsim.Gaussian(sigma=jitter * 1e-3))
    fine = PIXEL_SCALE / OVERSAMPLE  # arcsec per model px
    n_pt, n_gal = PSF_BOX * OVERSAMPLE, GAL_PSF_BOX * OVERSAMPLE
    eff = galsim.Convolve(optical, galsim.Pixel(PIXEL_SCALE))
    eff_img = eff.drawImage(nx=n_pt, ny=n_pt, scale=fine, method="no_pixel")
    opt_img = optical.drawImage(nx=n_gal, ny=n_gal, scale=fine, method="no_pixel")
    epsf = eff_img.array.astype(np.float64)
    epsf *= OVERSAMPLE**2 / epsf.sum()
    return PsfModel(
        point=galsim.InterpolatedImage(eff_img, x_interpolant="quintic").withFlux(1.0),
        optical=galsim.InterpolatedImage(opt_img, x_interpolant="quintic").withFlux(1.0),
        epsf=epsf,
        key=(band, sca, sca_x, sca_y, defocus, jitter),
    )


def cutout_wcs(pointing: Pointing, mjd: float) -> galsim.GSFitsWCS:
    """Roman TAN-SIP WCS of the cut-out (``galsim.roman.getWCS``), GalSim 1-based.

    The SCA WCS is shifted so that GalSim pixel ``(1, 1)`` of the cut-out is SCA
    pixel ``(x0 + 1, y0 + 1)``; the PA is given explicitly, so any date works.
    """
    world = galsim.CelestialCoord(pointing.ra * galsim.degrees, pointing.dec * galsim.degrees)
    full = roman.getWCS(
        world, PA=pointing.pa * galsim.degrees, date=mjd_to_datetime(mjd), SCAs=pointing.sca
    )[pointing.sca]
    return full.shiftOrigin(galsim.PositionI(-pointing.x0, -pointing.y0))


def wcs_header_cards(wcs: galsim.GSFitsWCS, size: int) -> list[tuple[str, object, str]]:
    """FITS cards of ``wcs`` for a ``size x size`` image (keyword, value, comment)."""
    hdr = galsim.FitsHeader()
    wcs.writeToFitsHeader(hdr, galsim.BoundsI(1, size, 1, size))
    cards = [(c.keyword, c.value, c.comment) for c in hdr.header.cards
             if c.keyword not in HEADER_DROP]
    cards.append(("RADESYS", "ICRS", "GalSim celestial coordinates"))
    return cards


def pixel_to_radec(wcs: galsim.GSFitsWCS, x: np.ndarray, y: np.ndarray):
    """0-based package positions -> ``(ra, dec)`` in deg, ``(n,)`` float64 each."""
    x = np.asarray(x, dtype=float) + GALSIM_ORIGIN
    y = np.asarray(y, dtype=float) + GALSIM_ORIGIN
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    ra, dec = wcs.xyToradec(x, y, units=galsim.degrees)
    return np.atleast_1d(ra) % 360.0, np.atleast_1d(dec)


@dataclasses.dataclass(frozen=True)
class Background:
    """Expected per-pixel background of one exposure, e- (over ``exptime``).

    ``total = zodi + thermal + dark`` is what the simulator subtracts;
    ``sigma`` (e-/s) is the background-only noise per pixel including read noise.
    """

    zodi: float  # e- / px, zodiacal light (getSkyLevel x pixel area)
    thermal: float  # e- / px, telescope thermal emission (roman.thermal_backgrounds)
    dark: float  # e- / px, dark current x exptime
    read_noise: float  # e- rms per pixel
    exptime: float  # s

    @property
    def total(self) -> float:
        return self.zodi + self.thermal + self.dark

    @property
    def sigma(self) -> float:
        return math.sqrt(self.total + self.read_noise**2) / self.exptime


def background(band: str, wcs: galsim.GSFitsWCS, size: int, mjd: float) -> Background:
    """Zodiacal sky at the cut-out centre and date, thermal, dark; Roman exposure time.

    ``getSkyLevel`` returns e-/arcsec^2 for the exposure; it is multiplied by the
    pixel area of the real WCS at the cut-out centre (arcsec^2).
    """
    centre = galsim.PositionD(0.5 * size + 0.5, 0.5 * size + 0.5)  # GalSim centre of the image
    sky = roman.getSkyLevel(
        bandpass(band), world_pos=wcs.toWorld(centre), exptime=roman.exptime,
        date=mjd_to_datetime(mjd),
    )
    return Background(
        zodi=float(sky * wcs.pixelArea(centre)),
        thermal=float(roman.thermal_backgrounds[band] * roman.exptime),
        dark=float(roman.dark_current * roman.exptime),
        read_noise=float(roman.read_noise),
        exptime=float(roman.exptime),
    )


def new_image(size: int) -> galsim.ImageF:
    """Blank ``size x size`` float32 GalSim image, bounds ``1..size``, 0.11"/px."""
    return galsim.ImageF(size, size, scale=PIXEL_SCALE, init_value=0.0)


def _stamp_bounds(image: galsim.ImageF, x: float, y: float, half: int) -> galsim.BoundsI:
    ix = int(math.floor(x + 0.5)) + GALSIM_ORIGIN  # GalSim index of the pixel holding x
    iy = int(math.floor(y + 0.5)) + GALSIM_ORIGIN
    return galsim.BoundsI(ix - half, ix + half, iy - half, iy + half) & image.bounds


def draw_points(image: galsim.ImageF, psf: PsfModel, x, y, flux) -> None:
    """Add point sources (``flux`` e-/s, may be negative) at 0-based ``(x, y)`` in place."""
    for xi, yi, fi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)):
        if fi == 0:
            continue
        b = _stamp_bounds(image, xi, yi, POINT_HALF)
        if b.isDefined():
            psf.point.withFlux(fi).drawImage(
                image=image[b], center=galsim.PositionD(xi + GALSIM_ORIGIN, yi + GALSIM_ORIGIN),
                method="no_pixel", add_to_image=True,
            )


def draw_galaxies(image: galsim.ImageF, psf: PsfModel, scene: Scene, index, flux,
                  xy=None, jacobian=None) -> None:
    """Add PSF-convolved sheared exponentials (``flux`` e-/s) in place.

    Stamp half side ``clip(6 hlr / 0.11" + 8, 12, 64)`` px. The galaxy's shape is defined
    in the scene's pixel frame; to draw it in another exposure's frame (another roll,
    :mod:`rtcnn.sim.survey`) give its position there, ``xy`` ``(n, 2)`` (0-based px,
    default the scene's), and ``jacobian`` ``(n, 2, 2)``, the derivative of that frame's
    pixel position with respect to the scene's: the profile is mapped by it
    (``galsim.GSObject.transform``) before the convolution with the detector-fixed PSF,
    at fixed total flux, so the galaxy is the same on the sky in every exposure.
    """
    for k, (i, fi) in enumerate(zip(np.asarray(index), np.asarray(flux, float))):
        hlr = float(scene.hlr[i])
        half = int(min(64, max(12, math.ceil(6 * hlr / PIXEL_SCALE) + 8)))
        x, y = (scene.x[i], scene.y[i]) if xy is None else (xy[k][0], xy[k][1])
        b = _stamp_bounds(image, x, y, half)
        if not b.isDefined():
            continue
        gal = galsim.Exponential(half_light_radius=hlr, flux=fi).shear(
            g1=float(scene.g1[i]), g2=float(scene.g2[i])
        )
        if jacobian is not None:
            j = np.asarray(jacobian[k], dtype=float)
            gal = gal.transform(j[0, 0], j[0, 1], j[1, 0], j[1, 1]).withFlux(fi)
        galsim.Convolve(gal, psf.optical).drawImage(
            image=image[b],
            center=galsim.PositionD(x + GALSIM_ORIGIN, y + GALSIM_ORIGIN),
            add_to_image=True,
        )


def render_static(size: int, psf: PsfModel, scene: Scene, mag: np.ndarray, zp: float):
    """Noise-free image (e-/s, ``(size, size) float32``) of every object with ``mag`` finite."""
    image = new_image(size)
    flux = mag_to_flux(mag, zp)
    gal = np.flatnonzero(scene.select(("galaxy",)) & (flux > 0))
    pts = np.flatnonzero(~scene.select(("galaxy",)) & (flux > 0))
    draw_galaxies(image, psf, scene, gal, flux[gal])
    draw_points(image, psf, scene.x[pts], scene.y[pts], flux[pts])
    return image.array


def psf_sum_sq(psf: PsfModel, x, y) -> np.ndarray:
    """``sum_i p_i**2`` of the unit-flux pixelated PSF at each 0-based ``(x, y)``, ``(n,)``.

    The stamp is drawn at the object's sub-pixel phase (no image-edge clipping).
    """
    out = np.zeros(len(x))
    n = 2 * POINT_HALF + 1
    for k, (xi, yi) in enumerate(zip(np.asarray(x, float), np.asarray(y, float))):
        stamp = galsim.ImageF(n, n, scale=PIXEL_SCALE)
        offset = galsim.PositionD(xi - math.floor(xi + 0.5), yi - math.floor(yi + 0.5))
        psf.point.drawImage(image=stamp, offset=offset, method="no_pixel")
        out[k] = float(np.sum(stamp.array.astype(np.float64) ** 2))
    return out


def add_exposure_noise(signal: np.ndarray, bkg: Background, rng: np.random.Generator):
    """One exposure: Poisson(signal + background) + Gaussian read noise, sky-subtracted.

    Parameters
    ----------
    signal : numpy.ndarray
        ``(ny, nx) float32``, noise-free scene, e-/s (>= 0 up to interpolation ringing).
    bkg : Background
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        ``(ny, nx) float32``, e-/s, with the *expected* background subtracted.
    """
    expected = np.clip(signal.astype(np.float64) * bkg.exptime + bkg.total, 0.0, None)
    image = galsim.ImageD(expected)
    image.addNoise(galsim.CCDNoise(_galsim_rng(rng), gain=1.0, read_noise=bkg.read_noise))
    return ((image.array - bkg.total) / bkg.exptime).astype(np.float32)


def add_source_noise(delta: np.ndarray, exptime: float, rng: np.random.Generator):
    """``delta`` (e-/s) plus the Poisson noise of its own counts only (inject mode).

    Negative changes (fading variables) get noise of the same amplitude ``|delta|``.
    Returns ``(ny, nx) float32`` e-/s.
    """
    counts = np.abs(delta.astype(np.float64)) * exptime
    image = galsim.ImageD(counts)
    image.addNoise(galsim.PoissonNoise(_galsim_rng(rng)))
    noise = (image.array - counts) / exptime
    return (delta + np.sign(delta) * noise).astype(np.float32)


def add_cosmic_rays(image: np.ndarray, rng: np.random.Generator, density: float,
                    energy: tuple[float, float], mean_length: float, exptime: float) -> int:
    """Add unrejected cosmic-ray hits to an e-/s image in place; return their number.

    ``N ~ Poisson(density * npix / 1e6)`` straight tracks with random start and angle,
    projected length ``~ Exp(mean_length)`` px, total charge log-uniform in ``energy``
    (e-), spread evenly over the pixels they cross.
    """
    ny, nx = image.shape
    n = int(rng.poisson(density * nx * ny / 1e6))
    for _ in range(n):
        x, y = rng.uniform(-0.5, nx - 0.5), rng.uniform(-0.5, ny - 0.5)
        length, angle = rng.exponential(mean_length), rng.uniform(0.0, math.pi)
        charge = math.exp(rng.uniform(math.log(energy[0]), math.log(energy[1])))
        t = np.linspace(0.0, length, max(2, int(length * 4) + 1))
        ix = np.clip(np.floor(x + t * math.cos(angle) + 0.5).astype(int), 0, nx - 1)
        iy = np.clip(np.floor(y + t * math.sin(angle) + 0.5).astype(int), 0, ny - 1)
        np.add.at(image, (iy, ix), np.float32(charge / exptime / t.size))
    return n


def _galsim_rng(rng: np.random.Generator) -> galsim.BaseDeviate:
    """A GalSim deviate seeded from the pair's numpy generator (reproducible)."""
    return galsim.BaseDeviate(int(rng.integers(1, 2**31 - 1)))
