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
                   "min_distance", "n_close_pairs", "likelihood_ratio", "score",
                   "exact_duplicate", "image_a", "image_b", "source_a", "source_b"]
IMAGE_COLUMNS = ["dataset_a", "image_a", "dataset_b", "image_b", "distance", "exact_duplicate",
                 "subject_a", "subject_b", "source_a", "source_b"]


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = SafeDictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def relative_source(ds, source: str) -> str:
    """A file path relative to its dataset's folder (as given when it is not under it)."""
    if ds.root and source:
        try:
            return Path(source).resolve().relative_to(Path(ds.root).resolve()).as_posix()
        except ValueError:
            pass
    return str(source)


def subject_rows(datasets, pairs) -> List[dict]:
    """One row per subject pair: posterior as ``probability``, then the evidence."""
    rows = []
    for p in pairs:
        a, b = datasets[p.a], datasets[p.b]
        best = p.best if p.image_pairs else None
        i, j = (best.i, best.j) if best is not None else (None, None)
        rows.append({
            "dataset_a": a.name, "subject_a": p.subject_a,
            "dataset_b": b.name, "subject_b": p.subject_b,
            "probability": round(p.posterior, 6),
            "min_distance": round(p.min_distance, 6), "n_close_pairs": p.n_close_pairs,
            "likelihood_ratio": float(f"{p.likelihood_ratio:.6g}"),
            "score": round(p.score, 6), "exact_duplicate": p.exact_duplicate,
            "image_a": a.image_ids[i] if i is not None else "",
            "image_b": b.image_ids[j] if j is not None else "",
            # Full paths: the CSV is for programs (the Slicer module loads these files);
            # the HTML page shows them relative to their dataset.
            "source_a": a.sources[i] if i is not None else "",
            "source_b": b.sources[j] if j is not None else "",
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


def histogram_png(path: Path, decision, cut: Optional[float]) -> None:
    """Subject-pair scores of these datasets: same-ID halves, different-ID pairs inside a
    dataset, and the pairs compared across datasets, with the decision drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = decision.reference
    cross = [c.scores for c in decision.comparisons if c.a != c.b]
    cross = np.concatenate(cross) if cross else np.zeros(0)
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=100)
    values = np.concatenate([ref.same, ref.different, cross, [cut or 0.0]])
    values = values[np.isfinite(values)]
    bins = np.linspace(0, float(values.max()) * 1.05 if len(values) and values.max() > 0 else 1.0, 60)
    drawn = "drawn without replacement" if ref.different_drawn else "all"
    if len(ref.different):
        ax.hist(ref.different, bins=bins, alpha=0.55, density=True, color="#d62728",
                label=f"different ID, within a dataset ({drawn}, n={len(ref.different)})")
    if len(cross):
        ax.hist(cross, bins=bins, density=True, histtype="step", color="#555",
                label=f"pairs across datasets (n={len(cross)})")
    if len(ref.same):
        ax.hist(ref.same, bins=bins, alpha=0.55, density=True, color="#1f77b4",
                label=f"same ID, images split in two (n={len(ref.same)})")
    if cut is not None:
        ax.axvline(cut, color="k", linestyle="--", label=f"decision (score {cut:.3g})")
    ax.set_xlabel("subject-pair score (mean nearest-image embedding distance)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
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


def _decision_score(decision) -> Optional[float]:
    """The cross-dataset score at which a pair reaches the posterior level (for the plot)."""
    import math

    cross = [c for c in decision.comparisons if c.a != c.b]
    if decision.threshold is not None:
        return decision.threshold
    if decision.level is None or not cross or not 0 < decision.level < 1:
        return None
    prior = cross[0].prior
    need = math.log(decision.level / (1 - decision.level)) - math.log(prior / (1 - prior))
    return decision.link.score_for_log_lr(need)


def _pair_card(e, datasets, pair, row, heatmaps) -> str:
    cells = []
    for ip in pair.image_pairs:
        figs = []
        for side, (k, idx) in (("a", (ip.a, ip.i)), ("b", (ip.b, ip.j))):
            ds = datasets[k]
            uri = thumbnail(str(ds.sources[idx]))
            rel = relative_source(ds, str(ds.sources[idx]))
            img = (f"<img alt='{e(rel)}' src='{uri}'>" if uri
                   else "<div class='noimg'>image not available</div>")
            heat = heatmaps.get((k, idx, ip.a if side == "b" else ip.b,
                                 ip.j if side == "a" else ip.i)) if heatmaps else None
            if heat:
                img += f"<img class='heat' alt='heatmap of {e(rel)}' src='{heat}'>"
            figs.append(f"<figure>{img}<figcaption>{e(rel)}</figcaption></figure>")
        tag = "<b class='exact'>exact duplicate</b>" if ip.exact_duplicate else \
            f"distance {ip.distance:.4f}"
        cells.append(f"<div class='imgpair'>{figs[0]}{figs[1]}<div>{tag}</div></div>")
    head = (f"<div class='who'>{e(row['dataset_a'])} / <b>{e(str(row['subject_a']))}</b> &harr; "
            f"{e(row['dataset_b'])} / <b>{e(str(row['subject_b']))}</b></div>")
    facts = (f"<div class='facts'><span class='prob'>{pair.posterior:.1%}</span> same-subject "
             f"posterior &middot; likelihood ratio {pair.likelihood_ratio:.3g} &middot; score "
             f"{pair.score:.4f} &middot; {pair.n_close_pairs} close image pair(s)"
             + (" &middot; <b class='exact'>shares an exact duplicate image</b>"
                if pair.exact_duplicate else "") + "</div>")
    return f"<div class='pair'>{head}{facts}<div class='imgpairs'>{''.join(cells)}</div></div>"


_MORE_STYLE = """
.pair{display:block}.imgpairs{display:flex;flex-wrap:wrap;gap:12px}.imgpair{display:flex;gap:4px;
align-items:center;border:1px dashed #ccc;padding:4px;font-size:12px}.heat{margin-left:2px}
.who{font-size:15px;margin-bottom:4px}.exact{color:#0a6}.alert{border:2px solid #a00;background:#fff0f0;
padding:10px 14px;border-radius:6px;margin:12px 0}.alert li{margin:4px 0}
"""


def write_html(path: Path, summary: dict, datasets, decision, subject_table: List[dict],
               exact, histogram: Optional[Path], heatmaps=None, max_cards: int = 40) -> None:
    e = html.escape
    check = summary["self_check"]
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             # No network: forbid every external load, allow only inline content and data URIs.
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
             "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
             "<title>SubjectFingerprint: shared subjects report</title>",
             f"<style>{_STYLE}{_MORE_STYLE}</style></head><body>",
             "<h1>Shared subjects report</h1>"]
    if check["warnings"]:
        parts.append("<div class='alert' id='self-check-warning'><b>Self-check: the model is not "
                     "reliable on these datasets.</b> The pairs below are candidates to review, "
                     "not confident findings.<ul>" +
                     "".join(f"<li>{e(w)}</li>" for w in check["warnings"]) + "</ul></div>")
    cal = summary["calibration"]
    facts = [
        ("Datasets", ", ".join(f"{d['name']} ({d['images']} images, {d['subjects']} subjects)"
                              for d in summary["datasets"])),
        ("Suspected shared subjects (across datasets)", summary["suspected_shared_subjects"]),
        ("Estimated shared subjects (from the data)", summary["estimated_shared_subjects"]),
        ("Shared subjects not confirmed at this level", summary["unconfirmed_shared_subjects"]),
        ("Suspected same person under two IDs within a dataset",
         summary["suspected_within_dataset_pairs"]),
        ("Expected false pairs among those listed", f"{summary['expected_false_pairs']:.3g}"),
        ("Decision", (f"at most {summary['max_false_pairs']:.3g} expected false subject pairs "
                      f"(lowest posterior listed: {summary['posterior_level']:.3g})"
                      if summary["posterior_level"] is not None else
                      f"at most {summary['max_false_pairs']:.3g} expected false subject pairs")
         if summary["decision_rule"] == "max-false-pairs" else
         f"{summary['decision_rule']}: image distance {summary['threshold']:.4g}"
         + (f" (false-positive rate {summary['false_positive_rate']:g} per image pair)"
            if summary.get("false_positive_rate") else "")),
        ("Calibration used", f"{cal['source']} (weight of the data {cal['data_weight']:.2f}; "
                             f"{cal.get('same_id_subjects', 0)} same-ID subjects, "
                             f"{cal.get('different_id_pairs', 0)} different-ID pairs)"),
        ("Model vs data", (f"log10 likelihood ratios differ by up to "
                           f"{cal['max_log10_lr_disagreement']:.2f}; " if
                           cal.get("max_log10_lr_disagreement") is not None else "") +
         (f"the model's threshold {cal['model_threshold']:.4g} (false-positive rate "
          f"{cal['model_fpr']:g}) gives {cal['observed_fpr_at_model_threshold']:.3g} on these "
          f"images" if cal.get("model_threshold") is not None else "")),
        ("Self-check", f"same-ID vs different-ID AUC "
                       f"{'n/a' if check['auc'] is None else format(check['auc'], '.3f')}; "
                       f"estimated recall at this level "
                       f"{'n/a' if check['estimated_recall'] is None else format(check['estimated_recall'], '.0%')}"),
        ("Exact duplicate image pairs", summary["exact_duplicate_pairs"]),
        ("Near-duplicate image pairs", summary["near_duplicate_pairs"]),
        ("Model", f"{summary['model_file']} (ID {summary['model_id']})"),
        ("Heatmaps", f"Grad-CAM of the pair similarity beside each image, for "
                     f"{summary.get('heatmaps', 0)} image pair(s) (warm: what pulls the two "
                     f"embeddings together)"),
        ("Unreadable files", len(summary["unreadable_files"])),
        ("Time taken", f"{summary['seconds']:.1f} s"),
    ]
    parts.append("<table class='summary'>")
    for key, value in facts:
        parts.append(f"<tr><td>{e(str(key))}</td><td>{e(str(value))}</td></tr>")
    parts.append("</table>")
    if histogram is not None and histogram.exists():
        parts.append("<h2>Scores of the real pairs</h2>")
        parts.append(f"<img alt='score histogram' src='{_png_uri(histogram)}'>")

    reported = decision.reported
    by_key = {id(p): r for p, r in zip(reported, subject_table)}
    for title, chosen, empty in (
            ("Shared subjects across datasets", [p for p in reported if not p.within],
             "No pair of subjects across datasets passes the decision."),
            ("Same person under two IDs within a dataset", [p for p in reported if p.within],
             "No pair of IDs within a dataset passes the decision.")):
        parts.append(f"<h2>{e(title)}</h2>")
        if not chosen:
            parts.append(f"<p>{e(empty)}</p>")
        for p in chosen[:max_cards]:
            parts.append(_pair_card(e, datasets, p, by_key[id(p)], heatmaps))
        if len(chosen) > max_cards:
            parts.append(f"<p>{len(chosen) - max_cards} more in the table below and in "
                         "subjects.csv.</p>")

    parts.append("<h2>Exact duplicate images</h2>")
    if not exact:
        parts.append("<p>None.</p>")
    else:
        parts.append("<table><tr><th>dataset</th><th>subject</th><th>file</th><th>dataset</th>"
                     "<th>subject</th><th>file</th></tr>")
        for p in exact:
            a, b = datasets[p.a], datasets[p.b]
            parts.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                a.name, a.subject_ids[p.i], relative_source(a, a.sources[p.i]),
                b.name, b.subject_ids[p.j], relative_source(b, b.sources[p.j]))) + "</tr>")
        parts.append("</table>")

    unconfirmed = [p for p in decision.pairs if not p.reported and not p.within][:10]
    parts.append("<h2>Most probable pairs not confirmed</h2>")
    parts.append(f"<p>About {e(str(summary['unconfirmed_shared_subjects']))} shared subject(s) "
                 "estimated from the data are not confirmed at this level.</p>")
    if unconfirmed:
        parts.append("<table><tr><th>pair</th><th>posterior</th><th>likelihood ratio</th>"
                     "<th>score</th></tr>")
        for p in unconfirmed:
            label = (f"{datasets[p.a].name} / {p.subject_a} - {datasets[p.b].name} / "
                     f"{p.subject_b}")
            parts.append(f"<tr><td>{e(label)}</td><td>{p.posterior:.3g}</td>"
                         f"<td>{p.likelihood_ratio:.3g}</td><td>{p.score:.4f}</td></tr>")
        parts.append("</table>")

    columns = ["dataset_a", "subject_a", "dataset_b", "subject_b", "probability",
               "likelihood_ratio", "min_distance", "n_close_pairs"]
    parts.append("<h2>All reported pairs (click a column to sort)</h2>")
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


def write_report(out_dir: Path, datasets, decision, exact, near_pairs, summary: dict,
                 heatmaps=None) -> dict:
    """Write every report file into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reported = decision.reported
    subjects = subject_rows(datasets, reported)
    _write_csv(out_dir / "subjects.csv", SUBJECT_COLUMNS, subjects)
    behind = [ip for p in reported for ip in p.image_pairs if not ip.exact_duplicate]
    _write_csv(out_dir / "images.csv", IMAGE_COLUMNS,
               image_rows(datasets, sorted(behind, key=lambda p: p.distance) + list(exact)
                          + list(near_pairs)))
    histogram = out_dir / "distances.png"
    histogram_png(histogram, decision, _decision_score(decision))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_html(out_dir / "index.html", summary, datasets, decision, subjects, exact, histogram,
               heatmaps)
    for name in ("subjects.csv", "images.csv", "summary.json", "distances.png", "index.html"):
        os.chmod(out_dir / name, 0o644)
    return {name: str(out_dir / name) for name in
            ("subjects.csv", "images.csv", "summary.json", "distances.png", "index.html")}
