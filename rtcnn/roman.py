"""Roman Space Telescope facts, defined once, as :mod:`galsim.roman` does.

Everything else in rtcnn imports the Roman instrument from here: the detector geometry,
the band names, the PSF width per band, the AB zero points and the one cached PSF.
GalSim itself is imported lazily (only :func:`bandpass`, :func:`get_psf` and the
functions built on them need it), so the constants cost nothing to import.

Bands
-----
Roman filters come in two spellings: ``F062 F087 F106 F129 F158 F184 F213 F146`` (L2
ASDF files, romanisim) and ``R062 Z087 Y106 J129 H158 F184 K213 W146`` (galsim.roman,
OpenUniverse). :func:`canonical_band` accepts either, in any case, and returns the
GalSim spelling (:data:`BANDS`), which every table here is keyed by. An unknown band is
an :class:`~rtcnn.errors.RtcnnInputError` naming it, never a silent H158. A *missing*
band (``None`` or empty: a header without ``BAND``/``FILTER``) is
:data:`DEFAULT_BAND` (H158, the survey's wide-field band and the simulator's default)
with a logged warning, so a band-less image still runs and the log says what was assumed.

PSF position convention
-----------------------
:func:`get_psf` takes SCA positions in GalSim's 1-based pixels (the first pixel's centre
is 1, an SCA image has bounds ``1..4088``), like ``galsim.roman.getPSF``. The SCA centre
is :data:`SCA_CENTRE` = ``(4088 + 1) / 2 = 2044.5``, the true centre
(``galsim.BoundsI(1, 4088, 1, 4088).true_center``) of that grid. ``getPSF``'s own default
(``n_pix / 2 = 2044``) is half a pixel off; the aberrations are interpolated bilinearly
across ~4000 px, so the two PSFs differ by ~1e-4 of the corner-to-corner change, far
below anything measured here, but one convention is used everywhere.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

from rtcnn.errors import RtcnnInputError

log = logging.getLogger(__name__)

SCA_NPIX = 4088  # px, side of the active area of a Roman H4RG SCA (galsim.roman.n_pix)
SCA_AREA = SCA_NPIX * SCA_NPIX  # px^2, one SCA
N_SCA = 18  # detectors in the Wide Field Instrument (galsim.roman.n_sca), numbered 1..18
PIXEL_SCALE = 0.11  # arcsec / px, WFI plate scale (galsim.roman.pixel_scale)
GALSIM_ORIGIN = 1  # GalSim / FITS index of the first pixel; package index = GalSim - 1
SCA_CENTRE = (SCA_NPIX + 1) / 2.0  # GalSim 1-based px, true centre of pixels 1..4088 (2044.5)
PUPIL_BIN = 8  # getPSF pupil-plane binning: ~0.05 s per PSF, adequate at 0.11"/px

#: Imaging filters, GalSim / OpenUniverse spelling (the canonical one here).
BANDS = ("R062", "Z087", "Y106", "J129", "H158", "F184", "K213", "W146")
#: The same filters in the L2 / romanisim spelling, in the order of :data:`BANDS`.
L2_BANDS = ("F062", "F087", "F106", "F129", "F158", "F184", "F213", "F146")
#: Either spelling (upper case) -> canonical (GalSim) spelling.
BAND_ALIASES = {**dict(zip(BANDS, BANDS)), **dict(zip(L2_BANDS, BANDS))}
DEFAULT_BAND = "H158"  # band assumed, with a warning, when an image names none

#: FWHM (px at 0.11"/px) of the Roman optical PSF convolved with the pixel, measured with
#: galsim.roman.getPSF(SCA 1, pupil_bin=8) at each band's effective wavelength.
FWHM_PX = {
    "R062": 1.105,
    "Z087": 1.075,
    "Y106": 1.105,
    "J129": 1.252,
    "H158": 1.393,
    "F184": 1.530,
    "K213": 1.740,
    "W146": 1.334,
}


def canonical_band(name: str | None, path=None) -> str:
    """The GalSim spelling of a Roman band given in either spelling, any case.

    Parameters
    ----------
    name : str or None
        ``'F158'``, ``'h158'``, ``'H158'``... ``None`` or blank: :data:`DEFAULT_BAND`,
        with a logged warning.
    path : str or os.PathLike, optional
        File the band comes from, named in the error / warning.

    Returns
    -------
    str
        One of :data:`BANDS`.

    Raises
    ------
    RtcnnInputError
        ``name`` is not a Roman imaging band (the message names it and lists both spellings).
    """
    key = "" if name is None else str(name).strip().upper()
    if not key:
        log.warning("%sno band given; assuming the Roman %s band",
                    f"{path}: " if path else "", DEFAULT_BAND)
        return DEFAULT_BAND
    try:
        return BAND_ALIASES[key]
    except KeyError:
        raise RtcnnInputError(path, f"unknown Roman band {name!r} (known: {' '.join(BANDS)}, "
                              f"or {' '.join(L2_BANDS)})") from None


def band_fwhm(band: str | None, path=None) -> float:
    """PSF FWHM in px (optical x pixel) of a Roman band, either spelling (:data:`FWHM_PX`).

    A missing band is H158 (logged); an unknown one raises :class:`RtcnnInputError`.
    """
    return FWHM_PX[canonical_band(band, path)]


@functools.lru_cache(maxsize=None)
def bandpass(band: str):
    """``galsim.Bandpass`` of a Roman band with GalSim's AB zero point set (cached)."""
    import galsim.roman

    return galsim.roman.getBandpasses(AB_zeropoint=True)[canonical_band(band)]


def bandpass_zeropoint(band: str) -> float:
    """AB magnitude of a source giving 1 photon / s / cm^2 through the band (GalSim's
    ``bandpass.zeropoint``; the Roman throughputs include the QE, so photons = e-)."""
    return float(bandpass(band).zeropoint)


def magzp(band: str) -> float:
    """AB magnitude of a source giving 1 e-/s in ``band`` on a Roman SCA.

    ``bandpass_zeropoint + 2.5 log10(collecting_area / cm^2)`` (26.51 for H158).
    """
    import galsim.roman

    return bandpass_zeropoint(band) + 2.5 * math.log10(galsim.roman.collecting_area)


@functools.lru_cache(maxsize=128)
def get_psf(band: str, sca: int, position: tuple[float, float] | None = None,
            defocus: float = 0.0, pupil_bin: int = PUPIL_BIN):
    """The Roman optical PSF (``galsim.roman.getPSF``), built once per argument set.

    Achromatic, at the band's effective wavelength (no SED dependence), without the
    pixel response.

    Parameters
    ----------
    band : str
        Roman band, either spelling.
    sca : int
        Detector, 1..18.
    position : (x, y), optional
        SCA position, GalSim 1-based px; default the SCA centre (:data:`SCA_CENTRE`).
    defocus : float
        Extra Zernike-4 aberration, waves at 1293 nm (GalSim's convention).
    pupil_bin : int
        Pupil-plane binning (1, 2, 4 or 8).

    Returns
    -------
    galsim.GSObject
        Unit-flux optical PSF, angular units arcsec.
    """
    import galsim
    import galsim.roman

    name = canonical_band(band)
    if not 1 <= int(sca) <= N_SCA:
        raise RtcnnInputError(None, f"SCA must be 1..{N_SCA}, got {sca}")
    x, y = (SCA_CENTRE, SCA_CENTRE) if position is None else position
    aberr = np.zeros(23)
    aberr[4] = defocus
    return galsim.roman.getPSF(int(sca), name, SCA_pos=galsim.PositionD(float(x), float(y)),
                               pupil_bin=int(pupil_bin),
                               wavelength=bandpass(name).effective_wavelength,
                               extra_aberrations=aberr)  # fmt: skip


def psf_stamp(band: str, sca: int, position: tuple[float, float] | None = None,
              size: int = 63, pupil_bin: int = PUPIL_BIN) -> np.ndarray:
    """The effective PSF (optical x pixel) of :func:`get_psf` drawn at the native scale.

    Returns
    -------
    numpy.ndarray
        ``(size, size) float64``, unit-flux profile sampled at 0.11"/px, centred on the
        stamp centre ``((size - 1) / 2, (size - 1) / 2)``; it sums to the flux inside the
        stamp (< 1: the wings beyond it are missing).
    """
    psf = get_psf(band, sca, position, 0.0, pupil_bin)
    return psf.drawImage(nx=size, ny=size, scale=PIXEL_SCALE).array.astype(np.float64)


@functools.lru_cache(maxsize=None)
def noise_equivalent_area(band: str, sca: int, position: tuple[float, float] | None = None
                          ) -> float:
    """``1 / sum(p^2)`` in px of the pixelised PSF ``p`` (normalised in a 64 px stamp).

    The number of pixels whose noise a PSF-fit flux carries: PSF S/N of a flux ``F`` on
    white noise ``sigma`` per px is ``F / (sigma sqrt(NEA))``.
    """
    img = psf_stamp(band, sca, position, 64)
    img = img / img.sum()
    return float(1.0 / np.sum(img**2))


__all__ = [
    "BANDS", "BAND_ALIASES", "DEFAULT_BAND", "FWHM_PX", "GALSIM_ORIGIN", "L2_BANDS", "N_SCA",
    "PIXEL_SCALE", "PUPIL_BIN", "SCA_AREA", "SCA_CENTRE", "SCA_NPIX", "band_fwhm", "bandpass",
    "bandpass_zeropoint", "canonical_band", "get_psf", "magzp", "noise_equivalent_area",
    "psf_stamp",
]
