"""Scene parameters and the random scene of one image pair (pure numpy, no drawing).

A scene is a table of objects placed on a ``size x size`` cut-out of one Roman
SCA, in the package pixel convention (:mod:`rtcnn`: 0-based, integer = pixel
centre, positions ``(x, y)``). Every object has an AB magnitude in the reference
(``mag_ref``) and in the new image (``mag_new``); ``NaN`` means "absent".

Object kinds
------------
* ``star``       -- point source, same flux in both images.
* ``variable``   -- point source whose magnitude changes by ``+-U(variable_dmag)``.
* ``galaxy``     -- sheared exponential disc, same flux in both images.
* ``transient``  -- point source present only in the new image; a fraction
  ``host_fraction`` sits on a galaxy at an offset drawn from the host's own
  exponential profile (``r ~ Gamma(2, r_d)``, sheared like the host), the rest
  are hostless and placed uniformly.

Counts scale with the area: ``N ~ Poisson(density * size**2 / 1e6)`` (densities
per Mpix; at 0.11"/px 1 Mpix = 1e6 px = 1.21e4 arcsec**2 = 9.34e-4 deg**2),
unless the count is given explicitly (``n_stars`` ...).
Magnitudes follow ``dN/dm ~ 10**(slope * m)`` between the given limits; transient
magnitudes are uniform so that the faint end reaches well below the detection
limit (~26.2 AB in one 139.8 s H158 exposure) and completeness falls to zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rtcnn.errors import RtcnnInputError
from rtcnn.roman import BANDS, DEFAULT_BAND, N_SCA, PIXEL_SCALE, SCA_NPIX

MIN_SIZE = 64  # px, smallest image side (one 64x64 tile)
MPIX = 1.0e6  # px per "Mpix", the unit of all densities
EXP_HLR_PER_SCALE = 1.6783469900166608  # exponential profile: half-light radius / scale length

# Default scene. Units in the comments; densities are per 1e6 px.
DEFAULTS: dict[str, Any] = {
    "band": DEFAULT_BAND,  # Roman filter (galsim.roman bandpass name)
    "sca": None,  # 1..18, or None = random SCA per pair
    "star_density": 40.0,  # stars / Mpix (~4e4 deg^-2, a mid-latitude field to H~26.5)
    "star_mag": (18.0, 26.5),  # AB mag range of stars
    "star_slope": 0.2,  # dN/dm ~ 10**(slope m) for stars
    "variable_fraction": 0.15,  # fraction of stars that vary between the epochs
    "variable_dmag": (0.2, 1.5),  # |mag_new - mag_ref| of variables, uniform, random sign
    "galaxy_density": 300.0,  # galaxies / Mpix (~3e5 deg^-2 to H~27.5, HUDF-like counts)
    "galaxy_mag": (19.0, 27.5),  # AB mag range of galaxies
    "galaxy_slope": 0.3,  # dN/dm ~ 10**(slope m) for galaxies
    "galaxy_hlr": 0.30,  # arcsec, median half-light radius at mag 24
    "galaxy_hlr_slope": -0.12,  # dex per mag: brighter galaxies are larger
    "galaxy_hlr_scatter": 0.2,  # dex, log-normal scatter of the half-light radius
    "galaxy_hlr_range": (0.05, 2.0),  # arcsec, clip of the half-light radius
    "galaxy_shear": 0.25,  # sigma of each reduced-shear component g1, g2 (|g| <= 0.7)
    "transient_density": 45.0,  # transients / Mpix (~47 per 1024x1024 pair)
    "transient_mag": (20.0, 27.5),  # AB mag range of transients, uniform
    "host_fraction": 0.7,  # fraction of transients placed on a host galaxy
    "host_mag_max": 25.5,  # AB, only galaxies brighter than this host transients
    "n_stars": None,  # explicit star count (overrides star_density)
    "n_galaxies": None,  # explicit galaxy count (overrides galaxy_density)
    "n_transients": None,  # explicit random-transient count (overrides transient_density)
    "forced_stars": (),  # extra constant stars: sequence of (x, y, mag) [px, px, AB]
    "forced_transients": (),  # extra hostless transients: sequence of (x, y, mag)
    "cosmic_ray_density": None,  # hits / Mpix per image; None = 50 in epochs, 0 in inject
    "cosmic_ray_energy": (300.0, 20000.0),  # e-, log-uniform deposited charge per hit
    "cosmic_ray_length": 1.5,  # px, mean (exponential) projected track length
    "mjd": 61587.0,  # MJD of the reference exposure (2027-07-01, field observable)
    "cadence_days": 5.0,  # days between reference and new exposure
    "field_ra": 9.5,  # deg, centre of the survey field (ELAIS-S1-like, high latitude)
    "field_dec": -44.0,  # deg
    "field_radius": 1.0,  # deg, pair pointings are uniform within this radius
    "pupil_bin": 8,  # galsim.roman.getPSF pupil binning (8 = fast, fine at 0.11"/px)
    "psf_defocus": 0.04,  # waves, max |extra defocus (Z4)| of the new epoch (epochs mode)
    "psf_jitter": (5.0, 15.0),  # mas, range of the Gaussian pointing-jitter sigma per epoch
}
MODES = ("inject", "epochs", "dither", "survey")
SURVEY_MODES = ("dither", "survey")  # exposures at other rolls (rtcnn.sim.survey)
COSMIC_RAY_DENSITY = {"inject": 0.0, "epochs": 50.0, "dither": 50.0,
                      "survey": 50.0}  # hits / Mpix, default per mode
#: Parameters that exist only where they apply (so the parameters, and the bytes of
#: params.json, of the other modes stay what they were): key -> (default, modes).
OPTIONAL = {
    "bands": (None, MODES),  # draw the band per pair from these ('all' = BANDS); None = band
    "n_epochs": (6, ("survey",)),  # exposures in the reference coadd
    "dither_px": (20.0, SURVEY_MODES),  # px, max dither of an exposure's centre per axis
}

_RANGE_KEYS = (
    "star_mag",
    "variable_dmag",
    "galaxy_mag",
    "galaxy_hlr_range",
    "transient_mag",
    "cosmic_ray_energy",
    "psf_jitter",
)
_FRACTION_KEYS = ("variable_fraction", "host_fraction")
_NONNEG_KEYS = (
    "star_density",
    "galaxy_density",
    "transient_density",
    "galaxy_hlr",
    "galaxy_hlr_scatter",
    "galaxy_shear",
    "cosmic_ray_length",
    "cadence_days",
    "field_radius",
    "psf_defocus",
)
_COUNT_KEYS = ("n_stars", "n_galaxies", "n_transients")
KINDS = ("star", "variable", "galaxy", "transient")


def resolve_params(mode: str, size: int, **scene_kwargs: Any) -> dict[str, Any]:
    """Merge ``scene_kwargs`` into :data:`DEFAULTS` and check every value.

    Parameters
    ----------
    mode : {'inject', 'epochs', 'dither', 'survey'}
        Simulation mode (only used for the mode-dependent defaults and :data:`OPTIONAL`).
    size : int
        Image side in px (checked against ``forced_*`` positions).
    **scene_kwargs
        Any key of :data:`DEFAULTS` or :data:`OPTIONAL` (``bands``, ``n_epochs``,
        ``dither_px``).

    Returns
    -------
    dict
        JSON-serialisable parameters (tuples become lists, numbers plain Python).

    Raises
    ------
    RtcnnInputError
        Unknown key or a value out of range (one line naming the parameter).
    """
    unknown = sorted(set(scene_kwargs) - set(DEFAULTS) - set(OPTIONAL))
    if unknown:
        raise RtcnnInputError(
            None, f"unknown scene parameter(s) {', '.join(unknown)}; known: "
            f"{', '.join([*DEFAULTS, *OPTIONAL])}"
        )
    p = {**DEFAULTS, **scene_kwargs}
    _optional_params(p, mode, scene_kwargs)
    if p["band"] not in BANDS:
        raise RtcnnInputError(None, f"unknown band {p['band']!r}; choose one of {', '.join(BANDS)}")
    if p["sca"] is not None:
        if not _is_int(p["sca"]) or not 1 <= p["sca"] <= N_SCA:
            raise RtcnnInputError(None, f"sca must be an integer 1..{N_SCA}, got {p['sca']!r}")
        p["sca"] = int(p["sca"])
    for key in _RANGE_KEYS:
        lo, hi = _pair(key, p[key])
        if lo > hi:
            raise RtcnnInputError(None, f"{key} must be (low, high) with low <= high, got {p[key]}")
        p[key] = [lo, hi]
    for key in _FRACTION_KEYS:
        p[key] = float(p[key])
        if not 0.0 <= p[key] <= 1.0:
            raise RtcnnInputError(None, f"{key} must be in [0, 1], got {p[key]}")
    for key in _NONNEG_KEYS:
        p[key] = float(p[key])
        if not (math.isfinite(p[key]) and p[key] >= 0):
            raise RtcnnInputError(None, f"{key} must be finite and >= 0, got {p[key]}")
    for key in _COUNT_KEYS:
        if p[key] is not None:
            if not _is_int(p[key]) or p[key] < 0:
                raise RtcnnInputError(None, f"{key} must be an integer >= 0, got {p[key]!r}")
            p[key] = int(p[key])
    for key in ("forced_stars", "forced_transients"):
        p[key] = _forced(key, p[key], size)
    if p["cosmic_ray_density"] is None:
        p["cosmic_ray_density"] = COSMIC_RAY_DENSITY[mode]
    p["cosmic_ray_density"] = float(p["cosmic_ray_density"])
    if p["cosmic_ray_density"] < 0:
        raise RtcnnInputError(
            None, f"cosmic_ray_density must be >= 0, got {p['cosmic_ray_density']}"
        )
    if not _is_int(p["pupil_bin"]) or p["pupil_bin"] not in (1, 2, 4, 8):
        raise RtcnnInputError(None, f"pupil_bin must be 1, 2, 4 or 8, got {p['pupil_bin']!r}")
    for key in ("star_slope", "galaxy_slope", "galaxy_hlr_slope", "mjd", "field_ra", "field_dec",
                "host_mag_max"):
        p[key] = float(p[key])
    if not -90.0 <= p["field_dec"] <= 90.0:
        raise RtcnnInputError(None, f"field_dec must be in [-90, 90] deg, got {p['field_dec']}")
    return p


def _optional_params(p: dict[str, Any], mode: str, given: Mapping[str, Any]) -> None:
    """Add and check the :data:`OPTIONAL` parameters that apply (in place)."""
    for key, (default, modes) in OPTIONAL.items():
        if key in given and given[key] is not None:
            p[key] = given[key]
        elif mode in modes and default is not None:
            p[key] = default
        else:
            p.pop(key, None)
    if "bands" in p:
        from rtcnn.roman import canonical_band

        names = p["bands"]
        if isinstance(names, str):
            names = BANDS if names.strip().lower() == "all" else names.split(",")
        p["bands"] = [canonical_band(str(b).strip()) for b in names if str(b).strip()]
        if not p["bands"]:
            raise RtcnnInputError(None, "bands must name at least one Roman band")
    if "n_epochs" in p:
        if not _is_int(p["n_epochs"]) or p["n_epochs"] < 1:
            raise RtcnnInputError(None, f"n_epochs must be an integer >= 1, got {p['n_epochs']!r}")
        p["n_epochs"] = int(p["n_epochs"])
    if "dither_px" in p:
        p["dither_px"] = float(p["dither_px"])
        if not (math.isfinite(p["dither_px"]) and p["dither_px"] >= 0):
            raise RtcnnInputError(None, f"dither_px must be finite and >= 0, got {p['dither_px']}")


def pair_band(params: Mapping[str, Any], seed: int, index: int) -> str:
    """The band of pair ``index``: ``params['band']``, or drawn uniformly from
    ``params['bands']`` with a generator of its own (``SeedSequence(seed, spawn_key=(index,
    1))``), so the pair's other random numbers do not depend on it."""
    bands = params.get("bands")
    if not bands:
        return params["band"]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1)))
    return str(bands[int(rng.integers(0, len(bands)))])


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pair(key: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise RtcnnInputError(None, f"{key} must be a pair (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RtcnnInputError(None, f"{key} must be finite, got {value!r}")
    return lo, hi


def _forced(key: str, rows: Any, size: int) -> list[list[float]]:
    out = []
    for row in rows:
        try:
            x, y, mag = (float(v) for v in row)
        except (TypeError, ValueError):
            raise RtcnnInputError(None, f"{key} rows must be (x, y, mag), got {row!r}") from None
        if not (-0.5 <= x < size - 0.5 and -0.5 <= y < size - 0.5 and math.isfinite(mag)):
            raise RtcnnInputError(None, f"{key} row {row!r} is off the {size}x{size} image")
        out.append([x, y, mag])
    return out


@dataclasses.dataclass(frozen=True)
class Pointing:
    """Where one pair looks: the exposure geometry shared by both images.

    Attributes
    ----------
    ra, dec : float
        deg, centre of the focal-plane array (``galsim.roman.getWCS`` ``world_pos``).
    pa : float
        deg, position angle of the observatory +Y axis.
    sca : int
        Detector 1..18.
    x0, y0 : int
        0-based SCA pixel of the cut-out's first pixel (the cut-out is
        ``[y0:y0+size, x0:x0+size]`` of the SCA).
    """

    ra: float
    dec: float
    pa: float
    sca: int
    x0: int
    y0: int


@dataclasses.dataclass
class Scene:
    """All objects of one pair, column arrays of length ``n`` (0-based px, AB mag).

    ``mag_ref`` / ``mag_new`` are ``NaN`` where the object is absent; ``hlr`` (arcsec),
    ``g1``, ``g2`` are set for galaxies only (``NaN`` / 0 otherwise); ``host_id`` is the
    id of a transient's host galaxy or -1.
    """

    id: np.ndarray  # (n,) int64
    kind: np.ndarray  # (n,) '<U9'
    x: np.ndarray  # (n,) float64, px
    y: np.ndarray  # (n,) float64, px
    mag_ref: np.ndarray  # (n,) float64, AB
    mag_new: np.ndarray  # (n,) float64, AB
    hlr: np.ndarray  # (n,) float64, arcsec
    g1: np.ndarray  # (n,) float64
    g2: np.ndarray  # (n,) float64
    host_id: np.ndarray  # (n,) int64

    def select(self, kinds: Sequence[str]) -> np.ndarray:
        """Boolean mask ``(n,)`` of the objects whose kind is in ``kinds``."""
        return np.isin(self.kind, list(kinds))

    @property
    def changed(self) -> np.ndarray:
        """Boolean mask ``(n,)`` of the objects whose flux differs between the images."""
        return self.select(("variable", "transient"))


def powerlaw_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float):
    """Draw ``n`` magnitudes with ``dN/dm ~ 10**(slope m)`` on ``[lo, hi]`` (inverse CDF)."""
    u = rng.uniform(size=n)
    if slope == 0 or hi == lo:
        return lo + u * (hi - lo)
    a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
    return np.log10(a + u * (b - a)) / slope


def _count(rng: np.random.Generator, explicit: int | None, density: float, size: int) -> int:
    return int(explicit) if explicit is not None else int(rng.poisson(density * size * size / MPIX))


def draw_pointing(rng: np.random.Generator, size: int, params: Mapping[str, Any]) -> Pointing:
    """Random pointing within ``field_radius`` of the field centre, random PA and cut-out.

    The pointing is uniform on the spherical cap; the cut-out origin is uniform over
    the SCA so that the optical PSF (which varies over the SCA) varies between pairs.
    """
    sca = params["sca"] if params["sca"] is not None else int(rng.integers(1, N_SCA + 1))
    cos_r = math.cos(math.radians(params["field_radius"]))
    rho = math.acos(1.0 - rng.uniform() * (1.0 - cos_r))  # rad, angular distance from centre
    theta = rng.uniform(0.0, 2.0 * math.pi)
    d0, r0 = math.radians(params["field_dec"]), math.radians(params["field_ra"])
    sin_d = math.sin(d0) * math.cos(rho) + math.cos(d0) * math.sin(rho) * math.cos(theta)
    dec = math.asin(max(-1.0, min(1.0, sin_d)))
    ra = r0 + math.atan2(
        math.sin(theta) * math.sin(rho) * math.cos(d0),
        math.cos(rho) - math.sin(d0) * sin_d,
    )
    pa = rng.uniform(0.0, 360.0)
    x0, y0 = (int(v) for v in rng.integers(0, SCA_NPIX - size + 1, size=2))
    return Pointing(math.degrees(ra) % 360.0, math.degrees(dec), pa, sca, x0, y0)


def make_scene(rng: np.random.Generator, size: int, params: Mapping[str, Any]) -> Scene:
    """Draw the objects of one ``size x size`` pair.

    Parameters
    ----------
    rng : numpy.random.Generator
        The pair's generator (the only source of randomness).
    size : int
        Image side, px.
    params : mapping
        Output of :func:`resolve_params`.

    Returns
    -------
    Scene
        Stars (constant and variable), galaxies, then transients; ids ``0..n-1``.
    """
    p = params
    lim = (-0.5, size - 0.5)  # px, the image extent in the package convention

    # Stars, a fraction of them variable.
    n_star = _count(rng, p["n_stars"], p["star_density"], size)
    s_xy = rng.uniform(*lim, size=(n_star, 2))
    s_mag = powerlaw_mags(rng, n_star, *p["star_mag"], p["star_slope"])
    s_var = rng.uniform(size=n_star) < p["variable_fraction"]
    s_dmag = rng.uniform(*p["variable_dmag"], size=n_star) * rng.choice([-1.0, 1.0], size=n_star)
    s_new = np.where(s_var, s_mag + s_dmag, s_mag)
    forced_s = np.asarray(p["forced_stars"], dtype=float).reshape(-1, 3)

    # Galaxies: sheared exponentials, brighter = larger.
    n_gal = _count(rng, p["n_galaxies"], p["galaxy_density"], size)
    g_xy = rng.uniform(*lim, size=(n_gal, 2))
    g_mag = powerlaw_mags(rng, n_gal, *p["galaxy_mag"], p["galaxy_slope"])
    log_hlr = (
        math.log10(max(p["galaxy_hlr"], 1e-6))
        + p["galaxy_hlr_slope"] * (g_mag - 24.0)
        + p["galaxy_hlr_scatter"] * rng.standard_normal(n_gal)
    )
    g_hlr = np.clip(10.0**log_hlr, *p["galaxy_hlr_range"])
    g_g = p["galaxy_shear"] * rng.standard_normal((n_gal, 2))
    g_abs = np.hypot(g_g[:, 0], g_g[:, 1])
    g_g *= np.where(g_abs > 0.7, 0.7 / np.maximum(g_abs, 1e-12), 1.0)[:, None]

    # Transients: on hosts (offset from the host's own profile) or hostless.
    n_tr = _count(rng, p["n_transients"], p["transient_density"], size)
    t_mag = rng.uniform(*p["transient_mag"], size=n_tr)
    hosts = np.flatnonzero(g_mag < p["host_mag_max"])
    t_hosted = (rng.uniform(size=n_tr) < p["host_fraction"]) & (hosts.size > 0)
    t_xy = rng.uniform(*lim, size=(n_tr, 2))
    t_host = np.full(n_tr, -1, dtype=np.int64)
    if hosts.size:
        pick = hosts[rng.integers(0, hosts.size, size=n_tr)]
        r_d = g_hlr[pick] / EXP_HLR_PER_SCALE / PIXEL_SCALE  # px, disc scale length
        r = rng.gamma(2.0, 1.0, size=n_tr) * r_d  # px, radial pdf ~ r exp(-r / r_d)
        phi = rng.uniform(0.0, 2.0 * math.pi, size=n_tr)
        off = _shear_offsets(r * np.cos(phi), r * np.sin(phi), g_g[pick, 0], g_g[pick, 1])
        hosted_xy = np.clip(g_xy[pick] + off, 0.0, size - 1.0)
        t_xy = np.where(t_hosted[:, None], hosted_xy, t_xy)
        t_host = np.where(t_hosted, pick, -1)
    forced_t = np.asarray(p["forced_transients"], dtype=float).reshape(-1, 3)

    nan = np.nan
    n_s, n_fs, n_ft = n_star, len(forced_s), len(forced_t)
    kind = np.concatenate([
        np.where(s_var, "variable", "star"),
        np.full(n_fs, "star"),
        np.full(n_gal, "galaxy"),
        np.full(n_tr + n_ft, "transient"),
    ]).astype("<U9")
    gal0 = n_s + n_fs  # index of the first galaxy (ids = indices)
    return Scene(
        id=np.arange(kind.size, dtype=np.int64),
        kind=kind,
        x=np.concatenate([s_xy[:, 0], forced_s[:, 0], g_xy[:, 0], t_xy[:, 0], forced_t[:, 0]]),
        y=np.concatenate([s_xy[:, 1], forced_s[:, 1], g_xy[:, 1], t_xy[:, 1], forced_t[:, 1]]),
        mag_ref=np.concatenate([s_mag, forced_s[:, 2], g_mag, np.full(n_tr + n_ft, nan)]),
        mag_new=np.concatenate([s_new, forced_s[:, 2], g_mag, t_mag, forced_t[:, 2]]),
        hlr=np.concatenate([np.full(n_s + n_fs, nan), g_hlr, np.full(n_tr + n_ft, nan)]),
        g1=np.concatenate([np.zeros(n_s + n_fs), g_g[:, 0], np.zeros(n_tr + n_ft)]),
        g2=np.concatenate([np.zeros(n_s + n_fs), g_g[:, 1], np.zeros(n_tr + n_ft)]),
        host_id=np.concatenate([
            np.full(n_s + n_fs + n_gal, -1),
            np.where(t_host >= 0, t_host + gal0, -1),
            np.full(n_ft, -1),
        ]).astype(np.int64),
    )


def _shear_offsets(dx, dy, g1, g2):
    """Apply the area-preserving reduced-shear matrix ``(g1, g2)`` to offsets, ``(n, 2)``.

    Same transformation as ``galsim.Shear(g1=g1, g2=g2).getMatrix()`` (GalSim's
    ``profile.shear``), vectorised.
    """
    f = 1.0 / np.sqrt(1.0 - g1 * g1 - g2 * g2)
    return np.stack([f * ((1 + g1) * dx + g2 * dy), f * (g2 * dx + (1 - g1) * dy)], axis=1)
