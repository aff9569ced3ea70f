"""``python -m rtcnn.vet CATALOG_OR_DIR... -o PAGE_DIR``: a static HTML page to vet candidates.

The page (``PAGE_DIR/index.html``) needs no server: open it from disk in any browser.

* Candidates of every catalog given (ECSV files, or directories holding them), sorted by
  ``reliability`` (the network score; ``score`` for older catalogs), highest first.
* Each row shows a thumbnail strip (aligned reference | new | difference; ref and new share
  one ZScale interval with an asinh stretch, the difference a ZScale interval symmetric
  about 0), its measurements, its flags and a link to its cutout FITS file. Thumbnails are
  PNG files loaded lazily (``loading="lazy"``): the page paints its first screen before the
  rest are fetched, so 5,000 candidates stay usable.
* Filters: minimum reliability, maximum magnitude (of ``|psf_flux|``), hide candidates with
  any chosen flag (:data:`rtcnn.fluxes.FLAG_BITS`), and label state.
* Keys: ``j``/``ArrowDown`` next, ``k``/``ArrowUp`` previous, ``r`` real, ``b`` bogus,
  ``u`` clear (the selection moves on after a label). Labels are kept in the browser's
  ``localStorage`` (per page) until exported.
* "Export CSV" / "Export ECSV" download ``labels.csv`` / ``labels.ecsv`` with the columns of
  :data:`LABEL_COLUMNS`; rtcnn reads them with :func:`read_labels`.

Thumbnails come from the cutout files when the catalog's metadata names a ``cutouts``
directory holding ``<id>.fits`` (``rtcnn.detect --cutouts``), otherwise from the pair images
the catalog names (``ref``/``new``), and those cutouts are written under
``PAGE_DIR/cutouts/<catalog>/``. A catalog without ``x``, ``y`` and ``reliability``/``score``
is a one-line error.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.visualization import AsinhStretch, ZScaleInterval
from tqdm.auto import tqdm

from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.fluxes import AB_MAG_NJY, FLAG_BITS

__all__ = ["LABEL_COLUMNS", "find_catalogs", "load_candidates", "read_labels", "thumbnail",
           "write_page"]

log = logging.getLogger(__name__)

THUMB_SIZE = 63  # px, side of each of the three thumbnails (cutouts are cropped to it)
THUMB_SCALE = 2  # CSS magnification of the thumbnails (nearest-neighbour)
ASINH_A = 0.1  # astropy AsinhStretch parameter of the ref/new thumbnails
#: Columns of an exported label file, in order: (name, unit, meaning).
LABEL_COLUMNS = (
    ("catalog", None, "catalog file the candidate comes from, as given to rtcnn.vet"),
    ("row", None, "0-based row of the candidate in that catalog"),
    ("id", None, "the candidate's id column (-1 if the catalog has none)"),
    ("x", "pix", "0-based column position"),
    ("y", "pix", "0-based row position"),
    ("ra", "deg", "right ascension"),
    ("dec", "deg", "declination"),
    ("reliability", None, "network score"),
    ("label", None, "real or bogus"),
    ("is_real", None, "True for label == real"),
)
MEASURE_COLUMNS = ("psf_flux", "psf_flux_err", "snr", "dmag", "ra", "dec")


# --------------------------------------------------------------------------- inputs
def find_catalogs(inputs: Sequence[str]) -> list[Path]:
    """ECSV catalogs of the command line: files as given, directories searched (``*.ecsv``,
    recursively, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.ecsv") if not q.name.startswith("labels"))
            if not found:
                raise RtcnnInputError(p, "directory holds no .ecsv catalog")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise RtcnnInputError(p, "no such file or directory")
    return out


def _read(path: Path) -> Table:
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as err:  # noqa: BLE001 - astropy raises many types for a bad file
        raise RtcnnInputError(path, f"not a readable ECSV catalog ({type(err).__name__})") from None
    missing = [c for c in ("x", "y") if c not in table.colnames]
    if "reliability" not in table.colnames and "score" not in table.colnames:
        missing.append("reliability")
    if missing:
        raise RtcnnInputError(path, f"catalog lacks column(s) {', '.join(missing)} needed "
                              "by the vetting page")  # fmt: skip
    return table


def _mag(table: Table) -> np.ndarray:
    if "psf_flux" not in table.colnames:
        return np.full(len(table), np.nan)
    f = np.abs(np.asarray(table["psf_flux"], np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, AB_MAG_NJY - 2.5 * np.log10(f), np.nan)


def _num(v) -> float | None:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


def load_candidates(paths: Sequence[Path]) -> tuple[list[dict], list[tuple[Path, Table]]]:
    """Rows of every catalog as plain dicts (sorted by reliability) and the tables read."""
    rows, tables = [], []
    for ci, path in enumerate(paths):
        table = _read(path)
        tables.append((path, table))
        rel = np.asarray(table["reliability" if "reliability" in table.colnames else "score"],
                         np.float64)  # fmt: skip
        mag = _mag(table)
        flags = (np.asarray(table["flags"], np.int64) if "flags" in table.colnames
                 else np.zeros(len(table), np.int64))  # fmt: skip
        ids = np.asarray(table["id"], np.int64) if "id" in table.colnames else None
        for i in range(len(table)):
            row = {"c": ci, "row": i, "id": int(ids[i]) if ids is not None else -1,
                   "x": _num(table["x"][i]), "y": _num(table["y"][i]),
                   "rel": _num(rel[i]), "mag": _num(mag[i]), "flags": int(flags[i])}  # fmt: skip
            for name in MEASURE_COLUMNS:
                if name in table.colnames:
                    row[name] = _num(table[name][i])
            if "is_negative" in table.colnames:
                row["neg"] = bool(table["is_negative"][i])
            rows.append(row)
    rows.sort(key=lambda r: -(r["rel"] if r["rel"] is not None else -np.inf))
    return rows, tables


# --------------------------------------------------------------------------- thumbnails
def _crop(arr: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    ny, nx = arr.shape
    y0, x0 = max(0, (ny - size) // 2), max(0, (nx - size) // 2)
    return arr[y0:y0 + size, x0:x0 + size]


def thumbnail(ref: np.ndarray, new: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """A ``(S, 3 S + 4)`` uint8 strip: ref | new | diff with 2 px gaps (S = stamp side).

    ref and new share one ZScale interval (of both) with an asinh stretch; the difference
    uses a ZScale interval made symmetric about 0, linear. NaN (masked, padded) is black.
    """
    ref, new, diff = (_crop(np.asarray(a, np.float64)) for a in (ref, new, diff))
    zs = ZScaleInterval()
    both = np.concatenate([ref[np.isfinite(ref)], new[np.isfinite(new)]])
    lo, hi = zs.get_limits(both) if both.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    stretch = AsinhStretch(ASINH_A)

    def scale(a, lo, hi, stretch=None):
        v = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
        if stretch is not None:
            v = stretch(v, clip=True)
        return np.where(np.isfinite(a), v * 255.0, 0.0).astype(np.uint8)

    finite = diff[np.isfinite(diff)]
    dlo, dhi = zs.get_limits(finite) if finite.size else (-1.0, 1.0)
    m = max(abs(dlo), abs(dhi), 1e-12)
    parts = [scale(ref, lo, hi, stretch), scale(new, lo, hi, stretch), scale(diff, -m, m)]
    s = ref.shape[0]
    gap = np.full((s, 2), 255, np.uint8)
    return np.concatenate([parts[0], gap, parts[1], gap, parts[2]], axis=1)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image as PILImage

    PILImage.fromarray(arr, mode="L").save(path, optimize=False)


def _cutout_source(path: Path, table: Table):
    """Where the stamps of a catalog come from: ('files', dir) or ('pair', (ref, new))."""
    meta = table.meta
    cut = meta.get("cutouts")
    if cut and "id" in table.colnames:
        d = Path(cut)
        d = d if d.is_absolute() else (path.parent / d)
        if d.is_dir():
            return "files", d
    ref, new = meta.get("ref"), meta.get("new")
    if ref and new and Path(ref).is_file() and Path(new).is_file():
        return "pair", (Path(ref), Path(new))
    raise RtcnnInputError(path, "no cutouts for the thumbnails: the catalog names no cutouts "
                          "directory (rtcnn.detect --cutouts) and no readable ref/new images")


# --------------------------------------------------------------------------- page
def write_page(inputs: Sequence[str], outdir, overwrite: bool = False,
               progress: bool = True) -> Path:
    """Build the page; returns ``PAGE_DIR/index.html``.

    Raises
    ------
    RtcnnInputError
        Missing or unreadable catalog, missing columns, no images for the thumbnails, or
        ``outdir`` exists and ``overwrite`` is False.
    """
    out = Path(outdir)
    paths = find_catalogs(inputs)
    rows, tables = load_candidates(paths)
    sources = [_cutout_source(p, t) for p, t in tables]
    if out.exists():
        if not overwrite:
            raise RtcnnInputError(out, "already exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise RtcnnInputError(out, "is a file, not a directory")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "thumbs").mkdir(parents=True)
    order = {(r["c"], r["row"]): k for k, r in enumerate(rows)}
    bar = tqdm(total=len(rows), desc="thumbnails", unit="cand", disable=not progress)
    for ci, ((path, table), (kind, src)) in enumerate(zip(tables, sources)):
        links = []
        if kind == "files":
            for i in range(len(table)):
                f = src / f"{int(table['id'][i])}.fits"
                with fits.open(f) as hdul:
                    arr = thumbnail(hdul["REF"].data, hdul["NEW"].data, hdul["DIFF"].data)
                _save_png(arr, tmp / "thumbs" / f"{order[(ci, i)]}.png")
                links.append(f)
                bar.update()
        else:
            from rtcnn.alerts import write_cutouts
            from rtcnn.align import read_aligned_pair

            ref, new, _ = read_aligned_pair(*src)  # the reference on the new grid
            cut_dir = tmp / "cutouts" / f"{ci}_{path.stem}"

            def draw(i, st, ci=ci):
                _save_png(thumbnail(st.ref, st.new, st.diff), tmp / "thumbs" / f"{order[(ci, i)]}.png")
                bar.update()

            files = write_cutouts(table, ref, new, cut_dir, on_stamp=draw)
            links = [out / "cutouts" / f"{ci}_{path.stem}" / f.name for f in files]
        for i, f in enumerate(links):
            rows[order[(ci, i)]]["cut"] = os.path.relpath(f, out).replace(os.sep, "/")
    bar.close()
    catalogs = [str(p) for p in paths]
    digest = hashlib.blake2b("|".join(catalogs).encode(), digest_size=6).hexdigest()
    page_key = f"rtcnn-vet:{digest}:{len(rows)}"
    data = {"catalogs": catalogs, "flags": FLAG_BITS, "rows": rows, "key": page_key,
            "thumb": THUMB_SIZE, "scale": THUMB_SCALE,
            "labelColumns": [list(c) for c in LABEL_COLUMNS]}  # fmt: skip
    (tmp / "candidates.js").write_text("window.RTCNN_VET = " + json.dumps(data, separators=(",", ":"))
                                       + ";\n")  # fmt: skip
    (tmp / "index.html").write_text(_HTML.replace("{{TITLE}}", html.escape(
        f"rtcnn vetting: {len(rows)} candidates from {len(paths)} catalog(s)")))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out / "index.html"


def read_labels(path) -> Table:
    """A label file exported by the page (CSV or ECSV) as a Table with ``is_real`` (bool)
    and 0-based ``x``, ``y``; use ``table[table["is_real"]]`` as vetted real sources."""
    from rtcnn.io import read_table

    table = read_table(path)
    missing = [c for c in ("x", "y", "label") if c not in table.colnames]
    if missing:
        raise RtcnnInputError(path, f"label file lacks column(s) {', '.join(missing)}")
    table["is_real"] = np.asarray([str(v) == "real" for v in table["label"]])
    return table


_HTML = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{position:sticky;top:0;background:#222;color:#eee;padding:6px 10px;z-index:2}
header label{margin-right:12px}header input[type=number]{width:5em}
button{margin-left:6px}
#list{padding:6px 10px}
.cand{display:flex;gap:12px;align-items:center;background:#fff;margin:4px 0;padding:4px;
 border-left:6px solid #bbb}
.cand.selected{outline:2px solid #0a6cff}
.cand.real{border-left-color:#2a2}.cand.bogus{border-left-color:#d22}
.cand img{image-rendering:pixelated;background:#000}
.meta{font-family:ui-monospace,monospace;white-space:pre;line-height:1.35}
.lab{font-weight:bold;min-width:4em}.lab.real{color:#2a2}.lab.bogus{color:#d22}
.help{color:#aaa}
</style></head><body>
<header>
<label>min reliability <input id="min-rel" type="number" step="0.05" min="0" max="1" value="0"></label>
<label>max mag <input id="max-mag" type="number" step="0.5" value=""></label>
<span id="flag-filters"></span>
<label>show <select id="label-filter"><option value="all">all</option>
<option value="unlabelled">unlabelled</option><option value="real">real</option>
<option value="bogus">bogus</option></select></label>
<b><span id="count">0</span></b> shown of <span id="total">0</span>,
<span id="n-labelled">0</span> labelled
<button id="export-csv">Export CSV</button><button id="export-ecsv">Export ECSV</button>
<div class="help">keys: j/&darr; next, k/&uarr; previous, r real, b bogus, u clear;
thumbnails: reference | new | difference</div>
</header>
<div id="list"></div>
<script src="candidates.js"></script>
<script>
"use strict";
(function () {
  const D = window.RTCNN_VET, rows = D.rows, W = D.thumb * D.scale;
  let labels = {};
  try { labels = JSON.parse(localStorage.getItem(D.key) || "{}"); } catch (e) { labels = {}; }
  const list = document.getElementById("list");
  const flagNames = Object.keys(D.flags);
  const ff = document.getElementById("flag-filters");
  ff.innerHTML = "hide flagged: " + flagNames.map(n =>
    `<label><input type="checkbox" id="hide-${n}" data-bit="${D.flags[n]}">${n}</label>`).join("");
  function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
  function flagText(f) { return flagNames.filter(n => f & D.flags[n]).join(",") || "-"; }
  const parts = rows.map((r, k) =>
    `<div class="cand" id="cand-${k}" data-k="${k}">` +
    `<img loading="lazy" decoding="async" width="${3 * W + 4 * D.scale}" height="${W}" ` +
    `src="thumbs/${k}.png" alt="candidate ${k}">` +
    `<div class="meta">#${k + 1}  reliability ${fmt(r.rel, 3)}  mag ${fmt(r.mag, 2)}  ` +
    `snr ${fmt(r.snr, 1)}${r.neg ? "  (faded)" : ""}\n` +
    `x ${fmt(r.x, 2)}  y ${fmt(r.y, 2)}  ra ${fmt(r.ra, 6)}  dec ${fmt(r.dec, 6)}\n` +
    `psf_flux ${fmt(r.psf_flux, 1)} +- ${fmt(r.psf_flux_err, 1)} nJy  flags ${flagText(r.flags)}\n` +
    `${D.catalogs[r.c]} row ${r.row}` + (r.cut ? `  <a href="${r.cut}">cutout</a>` : "") +
    `</div><div class="lab" id="lab-${k}"></div></div>`);
  list.innerHTML = parts.join("");
  const els = Array.from(list.children);
  document.getElementById("total").textContent = rows.length;
  function keyOf(r) { return r.c + ":" + r.row; }
  function paint(k) {
    const lab = labels[keyOf(rows[k])] || "";
    els[k].classList.toggle("real", lab === "real");
    els[k].classList.toggle("bogus", lab === "bogus");
    const l = document.getElementById("lab-" + k);
    l.textContent = lab; l.className = "lab " + lab;
  }
  let visible = [];
  function apply() {
    const minRel = parseFloat(document.getElementById("min-rel").value);
    const maxMag = parseFloat(document.getElementById("max-mag").value);
    let hideBits = 0;
    flagNames.forEach(n => { if (document.getElementById("hide-" + n).checked) hideBits |= D.flags[n]; });
    const lf = document.getElementById("label-filter").value;
    visible = [];
    rows.forEach((r, k) => {
      const lab = labels[keyOf(r)] || "";
      const show = !(r.rel !== null && !isNaN(minRel) && r.rel < minRel) &&
        !(!isNaN(maxMag) && (r.mag === null || r.mag > maxMag)) && !(r.flags & hideBits) &&
        (lf === "all" || (lf === "unlabelled" ? !lab : lab === lf));
      els[k].hidden = !show;
      if (show) visible.push(k);
    });
    document.getElementById("count").textContent = visible.length;
    document.getElementById("n-labelled").textContent = Object.keys(labels).length;
    if (visible.indexOf(sel) < 0) select(visible.length ? visible[0] : -1, false);
  }
  let sel = -1;
  function select(k, scroll) {
    if (sel >= 0) els[sel].classList.remove("selected");
    sel = k;
    if (k >= 0) { els[k].classList.add("selected"); if (scroll) els[k].scrollIntoView({block: "nearest"}); }
  }
  function step(d) {
    if (!visible.length) return;
    const i = visible.indexOf(sel);
    select(visible[Math.min(visible.length - 1, Math.max(0, i < 0 ? 0 : i + d))], true);
  }
  function mark(lab) {
    if (sel < 0) return;
    const key = keyOf(rows[sel]);
    if (lab) labels[key] = lab; else delete labels[key];
    try { localStorage.setItem(D.key, JSON.stringify(labels)); } catch (e) { /* private mode */ }
    paint(sel);
    document.getElementById("n-labelled").textContent = Object.keys(labels).length;
    step(1);
  }
  document.addEventListener("keydown", e => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    const k = e.key;
    if (k === "j" || k === "ArrowDown") { step(1); e.preventDefault(); }
    else if (k === "k" || k === "ArrowUp") { step(-1); e.preventDefault(); }
    else if (k === "r") mark("real");
    else if (k === "b") mark("bogus");
    else if (k === "u") mark("");
  });
  list.addEventListener("click", e => {
    const c = e.target.closest(".cand");
    if (c && e.target.tagName !== "A") select(Number(c.dataset.k), false);
  });
  ["min-rel", "max-mag", "label-filter"].forEach(id =>
    document.getElementById(id).addEventListener("input", apply));
  flagNames.forEach(n => document.getElementById("hide-" + n).addEventListener("change", apply));
  function labelRows() {
    const out = [];
    rows.forEach(r => {
      const lab = labels[keyOf(r)];
      if (!lab) return;
      out.push([D.catalogs[r.c], r.row, r.id, r.x, r.y, r.ra === undefined ? null : r.ra,
                r.dec === undefined ? null : r.dec, r.rel, lab, lab === "real" ? "True" : "False"]);
    });
    return out;
  }
  function csvCell(v) {
    if (v === null || v === undefined) return "";
    const s = String(v);
    return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function csvBody() {
    return [D.labelColumns.map(c => c[0]).join(",")].concat(
      labelRows().map(r => r.map(csvCell).join(","))).join("\n") + "\n";
  }
  function download(name, text) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], {type: "text/plain"}));
    a.download = name; document.body.appendChild(a); a.click(); a.remove();
  }
  const TYPES = {catalog: "string", row: "int64", id: "int64", x: "float64", y: "float64",
    ra: "float64", dec: "float64", reliability: "float64", label: "string", is_real: "bool"};
  document.getElementById("export-csv").addEventListener("click", () => download("labels.csv", csvBody()));
  document.getElementById("export-ecsv").addEventListener("click", () => {
    const head = ["# %ECSV 1.0", "# ---", "# datatype:"].concat(D.labelColumns.map(c =>
      `# - {name: ${c[0]}${c[1] ? ", unit: " + c[1] : ""}, datatype: ${TYPES[c[0]]}, description: '${c[2].replace(/'/g, "''")}'}`),
      ["# delimiter: ','", "# schema: astropy-2.0"]);
    download("labels.ecsv", head.join("\n") + "\n" + csvBody());
  });
  rows.forEach((r, k) => { if (labels[keyOf(r)]) paint(k); });
  apply();
  window.RTCNN_VET_READY = true;
})();
</script></body></html>
"""


# --------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m rtcnn.vet",
                      description="Write a static HTML page to vet candidates by eye and "
                      "export real/bogus labels.")  # fmt: skip
    p.add_argument("inputs", nargs="+", metavar="CATALOG_OR_DIR",
                   help="ECSV catalogs (rtcnn.detect), or directories holding them")
    p.add_argument("-o", "--output", required=True, help="page directory (index.html)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing page")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.vet``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    page = write_page(args.inputs, args.output, overwrite=args.overwrite,
                      progress=not args.no_progress)  # fmt: skip
    log.info("%s (%.2f s)", page, time.perf_counter() - t0)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
