"""OpenUniverse 2024 RomanTDS layout: file names, where each file lives, what it holds.

``root`` is the ``RomanTDS`` directory::

    images/simple_model/{band}/{pointing}/Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz
    truth/{band}/{pointing}/Roman_TDS_index_{band}_{pointing}_{sca}.txt
    Roman_TDS_obseq_*.fits      (here, one level up, or given explicitly)

Images: HDU 0 header only; HDU 1 ``SCI`` = counts for the whole exposure (e-, gain 1),
sky NOT subtracted; HDU 2 ``ERR``; HDU 3 ``DQ`` (non-zero = bad). The pointing number
is only in the file name. Paths only here (no file is opened), so that another storage
(an fsspec URL) needs only other path functions.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from rtcnn.errors import RtcnnInputError

IMAGE_DIR = Path("images") / "simple_model"  # image tree under the RomanTDS root
TRUTH_DIR = Path("truth")  # truth tree under the RomanTDS root
IMAGE_RE = re.compile(
    r"^Roman_TDS_simple_model_(?P<band>[A-Za-z]\d{3})_(?P<pointing>\d+)_(?P<sca>\d+)"
    r"\.fits(?:\.gz)?$")
TRUTH_RE = re.compile(
    r"^Roman_TDS_index_(?P<band>[A-Za-z]\d{3})_(?P<pointing>\d+)_(?P<sca>\d+)\.txt$")
OBSEQ_GLOB = "Roman_TDS_obseq_*.fits"  # observation sequence file name pattern
TRUTH_COLUMNS = ("object_id", "ra", "dec", "x", "y", "realized_flux", "flux", "mag", "obj_type")
OBSEQ_COLUMNS = ("ra", "dec", "filter", "exptime", "date", "pa")
SCI_HDU, ERR_HDU, DQ_HDU = "SCI", "ERR", "DQ"  # EXTNAMEs (HDUs 1, 2, 3)


@dataclasses.dataclass(frozen=True, order=True)
class OUKey:
    """Identity of one OpenUniverse exposure: band, pointing number, SCA number."""

    band: str
    pointing: int
    sca: int

    @property
    def stem(self) -> str:
        """``{band}_{pointing}_{sca}`` as in the file names."""
        return f"{self.band}_{self.pointing}_{self.sca}"


def parse_ou_name(path: str | os.PathLike) -> OUKey:
    """Band, pointing and SCA from an OpenUniverse image or truth file name.

    Raises
    ------
    RtcnnInputError
        The name matches neither ``Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits[.gz]``
        nor ``Roman_TDS_index_{band}_{pointing}_{sca}.txt``.
    """
    name = Path(path).name
    m = IMAGE_RE.match(name) or TRUTH_RE.match(name)
    if m is None:
        raise RtcnnInputError(
            path, "not an OpenUniverse file name (expected Roman_TDS_simple_model_"
            "{band}_{pointing}_{sca}.fits.gz or Roman_TDS_index_{band}_{pointing}_{sca}.txt)")
    return OUKey(m["band"].upper(), int(m["pointing"]), int(m["sca"]))


def ou_image_path(root: str | os.PathLike, key: OUKey, gz: bool = True) -> Path:
    """Path of the image of ``key`` under ``root`` (the ``RomanTDS`` directory)."""
    suffix = ".fits.gz" if gz else ".fits"
    return (Path(root) / IMAGE_DIR / key.band / str(key.pointing)
            / f"Roman_TDS_simple_model_{key.stem}{suffix}")


def ou_truth_path(root: str | os.PathLike, key: OUKey) -> Path:
    """Path of the truth table of ``key`` under ``root``."""
    return (Path(root) / TRUTH_DIR / key.band / str(key.pointing)
            / f"Roman_TDS_index_{key.stem}.txt")


def truth_path_for(image_path: str | os.PathLike) -> Path:
    """Truth-table path that belongs to an image path (same ``RomanTDS`` root)."""
    p = Path(image_path)
    key = parse_ou_name(p)
    # .../images/simple_model/{band}/{pointing}/file -> root is 4 levels up
    return ou_truth_path(p.parents[4] if len(p.parents) > 4 else p.parent, key)


def find_obseq(root: str | os.PathLike) -> Path | None:
    """The ``Roman_TDS_obseq_*.fits`` file in ``root`` or its parent, if exactly one."""
    root = Path(root)
    for d in (root, root.parent):
        found = sorted(d.glob(OBSEQ_GLOB))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RtcnnInputError(d, f"several obseq files ({', '.join(f.name for f in found)});"
                                  " name one with obseq=PATH")
    return None


__all__ = [
    "DQ_HDU",
    "ERR_HDU",
    "IMAGE_DIR",
    "IMAGE_RE",
    "OBSEQ_COLUMNS",
    "OBSEQ_GLOB",
    "OUKey",
    "SCI_HDU",
    "TRUTH_COLUMNS",
    "TRUTH_DIR",
    "TRUTH_RE",
    "find_obseq",
    "ou_image_path",
    "ou_truth_path",
    "parse_ou_name",
    "truth_path_for",
]
