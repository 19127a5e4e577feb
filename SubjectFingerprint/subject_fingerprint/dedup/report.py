"""The dedup report: subjects.csv, images.csv, summary.json, a histogram and index.html.

The HTML page is self-contained (inline CSS and script, thumbnails as data URIs) so it opens
offline and can be archived with the CSVs. Every string that comes from the data is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..csvsafe import SafeDictWriter, printable

SUBJECT_COLUMNS = ["dataset_a", "subject_a", "dataset_b", "subject_b", "probability",
                   "min_distance", "n_close_pairs", "image_a", "image_b", "source_a", "source_b"]
IMAGE_COLUMNS = ["dataset_a", "image_a", "dataset_b", "image_b", "distance", "exact_duplicate",
                 "subject_a", "subject_b", "source_a", "source_b"]


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = SafeDictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def subject_rows(datasets, pairs) -> List[dict]:
    rows = []
    for p in pairs:
        a, b = datasets[p.a], datasets[p.b]
        best = p.best
        # The best image pair may be stored either way round; orient it like the subjects.
        i, j = (best.i, best.j) if best.a == p.a and a.subject_ids[best.i] == p.subject_a \
            else (best.j, best.i)
        rows.append({
            "dataset_a": a.name, "subject_a": p.subject_a,
            "dataset_b": b.name, "subject_b": p.subject_b,
            "probability": "" if p.probability is None else round(p.probability, 6),
            "min_distance": round(p.min_distance, 6), "n_close_pairs": p.n_close_pairs,
            "image_a": a.image_ids[i], "image_b": b.image_ids[j],
            "source_a": a.sources[i], "source_b": b.sources[j],
        })
    return rows


def image_rows(datasets, image_pairs) -> List[dict]:
    rows = []
    for p in image_pairs:
        a, b = datasets[p.a], datasets[p.b]
        rows.append({
            "dataset_a": a.name, "image_a": a.image_ids[p.i],
            "dataset_b": b.name, "image_b": b.image_ids[p.j],
            "distance": round(p.distance, 6), "exact_duplicate": p.exact_duplicate,
            "subject_a": a.subject_ids[p.i], "subject_b": b.subject_ids[p.j],
            "source_a": a.sources[p.i], "source_b": b.sources[p.j],
        })
    return rows


def histogram_png(path: Path, same: np.ndarray, different: np.ndarray, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    values = np.concatenate([same, different]) if len(same) or len(different) else np.zeros(1)
    bins = np.linspace(0, max(float(values.max()), threshold) * 1.05 or 1.0, 60)
    if len(different):
        ax.hist(different, bins=bins, alpha=0.6, density=True, color="#d62728",
                label=f"different subjects (n={len(different)})")
    if len(same):
        ax.hist(same, bins=bins, alpha=0.6, density=True, color="#1f77b4",
                label=f"same subject ID (n={len(same)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("embedding distance")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def thumbnail(source: str, size: int = 160) -> Optional[str]:
    """A PNG data URI of the image at ``source`` (middle slice for volumes), or None."""
    from PIL import Image

    from ..io import read_image

    try:
        array = read_image(source).array
    except Exception:  # noqa: BLE001 - a missing thumbnail must not stop the report
        return None
    if array.ndim == 3:
        array = array[array.shape[0] // 2]
    lo, hi = np.percentile(array, [0.5, 99.5])
    scaled = np.clip((array - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    image = Image.fromarray((scaled * 255).astype(np.uint8))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _json_for_script(value) -> str:
    # Inside <script>, "</" would end the element and "<!--" opens a comment: escape "<".
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2;cursor:pointer;user-select:none}th.sorted-asc:after{content:" \\25B2"}th.sorted-desc:after{content:" \\25BC"}
.summary td:first-child{font-weight:600}.pair{border:1px solid #ddd;border-radius:6px;padding:10px;margin:10px 0;display:flex;gap:16px;align-items:center}
.pair figure{margin:0;text-align:center;font-size:12px}.pair img{width:160px;height:160px;object-fit:contain;background:#000}
.noimg{width:160px;height:160px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
.facts{font-size:14px}.prob{font-size:20px;font-weight:700}.warn{color:#a00}
"""

_SCRIPT = """
(function(){
  var rows = JSON.parse(document.getElementById('pair-data').textContent);
  var cols = JSON.parse(document.getElementById('pair-columns').textContent);
  var table = document.getElementById('pairs-table');
  var body = table.tBodies[0];
  function text(v){ return v === null || v === undefined ? '' : String(v); }
  function render(){
    while (body.firstChild) body.removeChild(body.firstChild);
    rows.forEach(function(r){
      var tr = document.createElement('tr'); tr.className = 'pair-row';
      cols.forEach(function(c){ var td = document.createElement('td'); td.textContent = text(r[c]); tr.appendChild(td); });
      body.appendChild(tr);
    });
  }
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function(th, k){
    th.addEventListener('click', function(){
      var col = cols[k], asc = !th.classList.contains('sorted-asc');
      Array.prototype.forEach.call(heads, function(h){ h.classList.remove('sorted-asc','sorted-desc'); });
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      rows.sort(function(a, b){
        var x = a[col], y = b[col];
        var nx = parseFloat(x), ny = parseFloat(y);
        var r = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : text(x).localeCompare(text(y));
        return asc ? r : -r;
      });
      render();
    });
  });
  render();
})();
"""


def write_html(path: Path, summary: dict, subject_table: List[dict], histogram: Optional[Path],
               max_cards: int = 50) -> None:
    e = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             # No network: forbid every external load, allow only inline content and data URIs.
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
             "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
             "<title>SubjectFingerprint: shared subjects report</title>",
             f"<style>{_STYLE}</style></head><body>",
             "<h1>Shared subjects report</h1>",
             "<table class='summary'>"]
    facts = [
        ("Datasets", ", ".join(f"{d['name']} ({d['images']} images, {d['subjects']} subjects)"
                              for d in summary["datasets"])),
        ("Suspected shared subjects (across datasets)", summary["suspected_shared_subjects"]),
        ("Suspected same-person IDs within a dataset", summary["suspected_within_dataset_pairs"]),
        ("Exact duplicate image pairs", summary["exact_duplicate_pairs"]),
        ("Near-duplicate image pairs", summary["near_duplicate_pairs"]),
        ("Threshold (embedding distance)", f"{summary['threshold']:.4g}"),
        ("Expected false-positive rate per image pair", summary.get("false_positive_rate")),
        ("Model", summary["model_id"]),
        ("Unreadable files", len(summary["unreadable_files"])),
        ("Time taken", f"{summary['seconds']:.1f} s"),
    ]
    for key, value in facts:
        parts.append(f"<tr><td>{e(str(key))}</td><td>{e(str(value))}</td></tr>")
    parts.append("</table>")
    if histogram is not None and histogram.exists():
        parts.append("<h2>Distances</h2>")
        parts.append(f"<img alt='distance histogram' src='{_png_uri(histogram)}'>")

    parts.append("<h2>Suspected pairs, most certain first</h2>")
    if not subject_table:
        parts.append("<p>No pair of subjects is closer than the threshold.</p>")
    for row in subject_table[:max_cards]:
        figures = []
        for side in ("a", "b"):
            uri = thumbnail(str(row[f"source_{side}"]))
            label = f"{row['dataset_' + side]} / {row['subject_' + side]}"
            img = (f"<img alt='{e(label)}' src='{uri}'>" if uri
                   else "<div class='noimg'>image not available</div>")
            figures.append(f"<figure>{img}<figcaption>{e(label)}<br>{e(str(row['image_' + side]))}"
                           f"</figcaption></figure>")
        prob = row["probability"]
        prob_text = f"{float(prob):.1%}" if prob != "" else "n/a (uncalibrated model)"
        parts.append(
            "<div class='pair'>" + figures[0] + figures[1] +
            f"<div class='facts'><div class='prob'>{e(prob_text)}</div>same-subject probability"
            f"<br>closest image distance {float(row['min_distance']):.4f}"
            f"<br>{int(row['n_close_pairs'])} close image pair(s)</div></div>")
    if len(subject_table) > max_cards:
        parts.append(f"<p>{len(subject_table) - max_cards} more pair(s) in the table below and in "
                     "subjects.csv.</p>")

    columns = ["dataset_a", "subject_a", "dataset_b", "subject_b", "probability",
               "min_distance", "n_close_pairs"]
    parts.append("<h2>All suspected pairs (click a column to sort)</h2>")
    parts.append("<table id='pairs-table'><thead><tr>" +
                 "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr></thead><tbody></tbody></table>")
    table_rows = [{c: r[c] for c in columns} for r in subject_table]
    parts.append(f"<script type='application/json' id='pair-data'>{_json_for_script(table_rows)}</script>")
    parts.append(f"<script type='application/json' id='pair-columns'>{_json_for_script(columns)}</script>")
    if summary["unreadable_files"]:
        parts.append("<h2 class='warn'>Unreadable files (skipped)</h2><ul>")
        for f in summary["unreadable_files"]:
            parts.append(f"<li>{e(f['path'])}: {e(f['reason'])}</li>")
        parts.append("</ul>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    # printable: file names that are not UTF-8 show escaped (\xe9) instead of failing.
    path.write_text(printable("\n".join(parts)), encoding="utf-8")


def write_report(out_dir: Path, datasets, subject_pairs, image_pairs, summary: dict,
                 same_distances, different_distances) -> dict:
    """Write every report file into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = subject_rows(datasets, subject_pairs)
    _write_csv(out_dir / "subjects.csv", SUBJECT_COLUMNS, subjects)
    _write_csv(out_dir / "images.csv", IMAGE_COLUMNS, image_rows(datasets, image_pairs))
    histogram = out_dir / "distances.png"
    histogram_png(histogram, same_distances, different_distances, summary["threshold"])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_html(out_dir / "index.html", summary, subjects, histogram)
    for name in ("subjects.csv", "images.csv", "summary.json", "distances.png", "index.html"):
        os.chmod(out_dir / name, 0o644)
    return {name: str(out_dir / name) for name in
            ("subjects.csv", "images.csv", "summary.json", "distances.png", "index.html")}
