"""Self-contained HTML report of a before/after checkpoint comparison (the automatic form of the paper's Table 5).

:func:`write_report` writes one folder: ``index.html`` (inline CSS, no scripts, no external URLs),
``comparison.json`` (:meth:`ComparisonStats.to_dict`) and ``images/`` with copies of every image and heatmap the
page shows, linked relatively, so the folder can be zipped, moved or served as is. The page holds a summary table
(per score: mean A, mean B, d̄ = mean(B − A) with its paired bootstrap 95 % interval, win/tie/loss), one stacked
five-bin bar per score (plain ``div`` widths), and one section per prompt, best improvement first (by the mean
difference of the overall score), with the A and B image of every seed side by side, their scores, the
implausibility (and misalignment) heatmap overlays when the records have them, and the misaligned keywords.

Heatmaps: a ``.png`` is shown as it is (already an overlay); a ``.npy`` (or single-array ``.npz``) map of shape
(H, W), float in [0, 1], is resized to the image and blended onto it in red (misalignment in blue).

The top of the page (and of ``report.md``, the same summary in markdown) names A and B: the generator identity
the records carry (backend, model, revision) and the LoRA adapter (its content hash from the records, and its
path when the caller passes ``sides``). A mean difference whose 95 % interval includes 0, or that rounds to
0.000, is shown as a tie (neutral colour, "tie"), never as a signed win or loss. When the records carry ground
truth (the synthetic world; ``stats.truth``), a second table puts RAHF's and the true statistics side by side
(per score mean A, mean B, d and its interval; the true implausible area too), in the page and in ``report.md``.
"""

from __future__ import annotations

import contextlib
import html
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.atomic import atomic_write_text
from common.records import ImageRecord
from compare.stats import BIN_SYMBOLS, BINS, ComparisonStats, PairingReport, PromptStats, ScoreStats

#: heatmap kinds shown, with the overlay colour of a ``.npy`` map
HEATMAP_COLORS = {"implausibility": (255, 0, 0), "misalignment": (0, 90, 255)}
#: opacity of a heatmap value of 1 in an overlay
OVERLAY_ALPHA = 0.6
_BIN_COLORS = {
    "much_better": "#1a7f37",
    "better": "#7bc96f",
    "same": "#c8ccd1",
    "worse": "#f0926e",
    "much_worse": "#c0392b",
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.15em;margin:0 0 8px}h3{font-size:.95em;margin:4px 0}
.meta{color:#57606a;margin:0 0 16px}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right}th{background:#f6f8fa}
td.name,th.name{text-align:left}
.pos{color:#1a7f37;font-weight:600}.neg{color:#c0392b;font-weight:600}.zero{color:#57606a}
table.sides td{text-align:left}
.bars{margin:8px 0 24px;max-width:900px}
.barrow{display:flex;align-items:center;margin:4px 0}
.barlabel{width:120px;flex:none}
.bar{display:flex;flex:1;height:24px;border:1px solid #d0d7de;background:#f6f8fa}
.seg{height:100%;color:#fff;font-size:11px;line-height:24px;text-align:center;overflow:hidden;white-space:nowrap}
.legend span{display:inline-block;margin-right:14px;font-size:.85em}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;margin:8px 0 16px}
.warn li{font-size:.9em}
section.prompt{border-top:2px solid #d0d7de;padding:16px 0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin:8px 0 16px}
.side{border:1px solid #d0d7de;padding:8px;background:#fafbfc}
.side.b{background:#f3f9f4}
.imgs{display:flex;gap:8px}
.imgs figure{margin:0;flex:1}
.imgs img{width:100%;max-width:256px;image-rendering:pixelated;display:block;border:1px solid #d0d7de}
figcaption{font-size:.8em;color:#57606a}
.missing{width:100%;max-width:256px;aspect-ratio:1;display:flex;align-items:center;justify-content:center;
  background:#eee;color:#888;font-size:.8em;text-align:center}
.scores td,.scores th{padding:2px 6px;font-size:.85em}
.keywords{font-size:.9em}.keywords .kw{background:#ffe2e0;padding:0 4px;margin-right:4px;border-radius:3px}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _rounds_to_zero(x: float) -> bool:
    return abs(x) < 0.0005  # shown as 0.000 at three decimals


def _signed(x: float, tie: float = 0.0) -> str:
    """A difference, green / red beyond ``tie``; one that rounds to 0.000 is shown unsigned and neutral."""
    if _rounds_to_zero(x):
        return '<span class="zero">0.000</span>'
    cls = "pos" if x > tie else "neg" if x < -tie else "zero"
    return f'<span class="{cls}">{x:+.3f}</span>'


def is_tie(diff: float, ci_low: float, ci_high: float) -> bool:
    """A mean difference the data cannot sign: its 95 % interval includes 0, or it rounds to 0.000."""
    return ci_low <= 0.0 <= ci_high or _rounds_to_zero(diff)


def _num(x: float) -> str:
    """``+0.123`` / ``-0.123``; ``0.000`` for a value that rounds to zero (never ``-0.000``)."""
    return "0.000" if _rounds_to_zero(x) else f"{x:+.3f}"


def _mean_diff(diff: float, ci_low: float, ci_high: float) -> str:
    if is_tie(diff, ci_low, ci_high):
        why = "95 % interval includes 0" if ci_low <= 0.0 <= ci_high else "rounds to 0.000"
        return f'<span class="zero tie" title="{why}">{_num(diff)} · tie</span>'
    return _signed(diff)


# ---------------------------------------------------------------------------------------------------------
# Which checkpoints A and B are
# ---------------------------------------------------------------------------------------------------------


def _identity_name(g: Mapping[str, Any]) -> str:
    """``backend:model@revision`` of a record's generator identity dict (missing parts left out)."""
    name = ":".join(str(g[k]) for k in ("backend", "model") if g.get(k))
    return name + (f"@{g['revision']}" if g.get("revision") else "") or "unknown"


def describe_sides(
    pairs: Sequence[tuple[ImageRecord, ImageRecord]],
    sides: Mapping[str, Mapping[str, Any]] | None = None,
    labels: tuple[str, str] = ("A", "B"),
) -> dict[str, dict[str, Any]]:
    """What A and B are: {"a": {...}, "b": {...}} with ``label``, ``generator`` (the identities the records carry,
    e.g. ``["amused:amused/amused-256"]``), ``adapter_hashes`` (their LoRA content hashes; empty: no adapter),
    and, from ``sides`` (e.g. ``{"a": {"generator": "amused-tiny", "lora": None}, "b": {...}}``), ``requested``
    (the generator name asked for) and ``adapter_path``."""
    out: dict[str, dict[str, Any]] = {}
    for i, side in enumerate("ab"):
        records = [pair[i] for pair in pairs]
        given = (sides or {}).get(side) or {}
        out[side] = {
            "label": labels[i],
            "generator": sorted({_identity_name(r.generator) for r in records}),
            "adapter_hashes": sorted(
                {str(r.generator["adapter_hash"]) for r in records if r.generator.get("adapter_hash")}
            ),
            "requested": given.get("generator"),
            "adapter_path": given.get("lora"),
        }
    return out


def _adapter_text(d: Mapping[str, Any]) -> str:
    parts = []
    if d["adapter_path"]:
        parts.append(str(d["adapter_path"]))
    if d["adapter_hashes"]:
        parts.append("hash " + ", ".join(d["adapter_hashes"]))
    return " · ".join(parts) or "none"


def _generator_text(d: Mapping[str, Any]) -> str:
    found = ", ".join(d["generator"]) or "no records"
    asked = d["requested"]
    return f"{asked} ({found})" if asked and asked not in d["generator"] else found


def _sides_table(described: Mapping[str, Mapping[str, Any]]) -> str:
    rows = "".join(
        f'<tr data-side="{side}"><th>{side.upper()}</th><td>{_e(d["label"])}</td><td class="generator">'
        f'{_e(_generator_text(d))}</td><td class="adapter">{_e(_adapter_text(d))}</td></tr>'
        for side, d in described.items()
    )
    head = "<tr><th>side</th><th>name</th><th>generator</th><th>LoRA adapter</th></tr>"
    return f'<table class="sides">{head}{rows}</table>'


def report_markdown(
    stats: ComparisonStats, described: Mapping[str, Mapping[str, Any]], title: str = "Checkpoint comparison"
) -> str:
    """The report's top in markdown: A and B named, then per score mean A, mean B, d with its 95 % interval (a
    tie when the interval includes 0 or d rounds to 0.000) and win / tie / loss."""
    lines = [f"# {title}", "", "| side | name | generator | LoRA adapter |", "|---|---|---|---|"]
    lines += [
        f"| {side.upper()} | {d['label']} | {_generator_text(d)} | {_adapter_text(d)} |"
        for side, d in described.items()
    ]
    lines += [
        "",
        f"{stats.n_pairs} pairs, {len(stats.prompts)} prompts; paired bootstrap, {stats.n_boot} resamples.",
        "",
        "| score | mean A | mean B | d = B − A | 95 % interval | win / tie / loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in stats.scores.values():
        lines.append(f"| {s.name} | {' | '.join(_md_cells(s))} | {s.wins} / {s.ties} / {s.losses} |")
    if stats.truth is not None:
        lines += [
            "",
            "## RAHF and the truth (synthetic world)",
            "",
            "| score | RAHF mean A | RAHF mean B | RAHF d | RAHF 95 % interval | true mean A | true mean B | true d | "
            "true 95 % interval |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, rahf, true in _side_by_side(stats, stats.truth):
            cells = (_md_cells(rahf) if rahf else ["–"] * 4) + (_md_cells(true) if true else ["–"] * 4)
            lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _md_cells(s: ScoreStats) -> list[str]:
    """mean A, mean B, d (marked a tie) and its interval, as markdown cells."""
    d = _num(s.diff) + (" (tie)" if is_tie(s.diff, s.ci_low, s.ci_high) else "")
    return [f"{s.mean_a:.3f}", f"{s.mean_b:.3f}", d, f"[{_num(s.ci_low)}, {_num(s.ci_high)}]"]


def _side_by_side(
    stats: ComparisonStats, truth: ComparisonStats
) -> list[tuple[str, ScoreStats | None, ScoreStats | None]]:
    """(name, RAHF's statistics, the true ones) of every name either side compares, RAHF's order first."""
    names = dict.fromkeys([*stats.scores, *truth.scores])
    return [(n, stats.scores.get(n), truth.scores.get(n)) for n in names]


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def local_path(uri: str) -> Path | None:
    """The local file behind ``uri`` (a path or ``file://`` URI), or None when it is remote, empty or missing."""
    if not uri:
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        return None
    p = Path(uri)
    return p if p.is_file() else None


def _copy(src: Path, images: Path, stem: str) -> str:
    suffix = src.suffix.lower() if src.suffix.lower() in _IMAGE_SUFFIXES else ".png"
    dst = images / f"{stem}{suffix}"
    if suffix == src.suffix.lower():
        with contextlib.suppress(shutil.SameFileError):  # already in place
            shutil.copyfile(src, dst)
    else:  # unknown suffix: let PIL read it and write a PNG the browser can show
        with Image.open(src) as im:
            im.save(dst, format="PNG")
    return f"images/{dst.name}"


def load_heatmap(path: Path) -> np.ndarray:
    """(H, W) float64 map in [0, 1] from a ``.npy`` or single-array ``.npz`` file."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            if len(z.files) != 1:
                raise ValueError(f"{path}: expected one array in the .npz, found {z.files}")
            m = z[z.files[0]]
    else:
        m = np.load(path, allow_pickle=False)
    m = np.asarray(m, np.float64)
    if m.ndim != 2:
        raise ValueError(f"{path}: heatmap must be (H, W), got shape {m.shape}")
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError(f"{path}: heatmap values must be finite and in [0, 1]")
    return m


def heatmap_overlay(image: Image.Image | None, heatmap: np.ndarray, color: tuple[int, int, int]) -> Image.Image:
    """Blend an (H, W) map in [0, 1] onto ``image`` in ``color`` (map resized to the image); gray when None."""
    if image is None:
        image = Image.new("RGB", (heatmap.shape[1], heatmap.shape[0]), (128, 128, 128))
    base = np.asarray(image.convert("RGB"), np.float32)
    m = Image.fromarray(heatmap.astype(np.float32)).resize(image.size, Image.Resampling.BILINEAR)
    w = np.clip(np.asarray(m, np.float32), 0, 1)[..., None] * OVERLAY_ALPHA
    out = base * (1 - w) + np.asarray(color, np.float32) * w
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _heatmap_file(uri: str, image: Path | None, kind: str, images: Path, stem: str) -> str | None:
    src = local_path(uri)
    if src is None:
        return None
    heatmap = None
    if src.suffix.lower() in (".npy", ".npz"):
        heatmap = load_heatmap(src)
    elif src.is_file():
        with Image.open(src) as hm:
            if hm.mode in ("L", "I;16"):  # a stored map (the run store writes uint8 maps), not an overlay
                heatmap = np.asarray(hm.convert("F"), np.float64) / (65535.0 if hm.mode == "I;16" else 255.0)
    if heatmap is not None:
        base = None
        if image is not None:
            with Image.open(image) as im:
                base = im.convert("RGB")
        heatmap_overlay(base, np.clip(heatmap, 0, 1), HEATMAP_COLORS[kind]).save(images / f"{stem}.png")
        return f"images/{stem}.png"
    return _copy(src, images, stem)


# ---------------------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------------------


def _summary_table(stats: ComparisonStats) -> str:
    head = (
        '<tr><th class="name">score</th><th>mean A</th><th>mean B</th><th>d = B − A</th><th>95 % interval</th>'
        "<th>win</th><th>tie</th><th>loss</th></tr>"
    )
    rows = [
        f'<tr data-score="{_e(s.name)}"><td class="name">{_e(s.name)}</td><td>{s.mean_a:.3f}</td>'
        f"<td>{s.mean_b:.3f}</td><td>{_mean_diff(s.diff, s.ci_low, s.ci_high)}</td>"
        f"<td>[{_num(s.ci_low)}, {_num(s.ci_high)}]</td>"
        f"<td>{s.wins}</td><td>{s.ties}</td><td>{s.losses}</td></tr>"
        for s in stats.scores.values()
    ]
    return f'<table class="summary">{head}{"".join(rows)}</table>'


def _html_cells(s: ScoreStats | None) -> str:
    if s is None:
        return '<td class="zero">–</td>' * 4
    return (
        f"<td>{s.mean_a:.3f}</td><td>{s.mean_b:.3f}</td><td>{_mean_diff(s.diff, s.ci_low, s.ci_high)}</td>"
        f"<td>[{_num(s.ci_low)}, {_num(s.ci_high)}]</td>"
    )


def _truth_table(stats: ComparisonStats) -> str:
    """RAHF's and the true statistics side by side (empty without truth)."""
    if stats.truth is None:
        return ""
    head = (
        '<tr><th class="name" rowspan="2">score</th><th colspan="4">RAHF</th><th colspan="4">truth</th></tr>'
        + "<tr>"
        + "<th>mean A</th><th>mean B</th><th>d = B − A</th><th>95 % interval</th>" * 2
        + "</tr>"
    )
    rows = "".join(
        f'<tr data-score="{_e(name)}"><td class="name">{_e(name)}</td>{_html_cells(rahf)}{_html_cells(true)}</tr>'
        for name, rahf, true in _side_by_side(stats, stats.truth)
    )
    return (
        '<h2>RAHF and the truth (synthetic world)</h2><p class="meta">The images carry their ground truth: the '
        "true scores and true implausible area, paired the same way.</p>"
        f'<table class="truth">{head}{rows}</table>'
    )


def _bin_bars(stats: ComparisonStats) -> str:
    rows = []
    for s in stats.scores.values():
        segs = "".join(
            f'<div class="seg bin-{b}" style="width:{100 * s.bin_fractions[b]:.4f}%;background:{_BIN_COLORS[b]}" '
            f'title="{_e(BIN_SYMBOLS[b])}: {s.bin_counts[b]}">'
            f"{f'{100 * s.bin_fractions[b]:.0f}%' if s.bin_fractions[b] >= 0.06 else ''}</div>"
            for b in BINS
        )
        rows.append(
            f'<div class="barrow"><div class="barlabel">{_e(s.name)}</div>'
            f'<div class="bar" data-score="{_e(s.name)}">{segs}</div></div>'
        )
    legend = "".join(f'<span><i style="background:{_BIN_COLORS[b]}"></i>{_e(BIN_SYMBOLS[b])}</span>' for b in BINS)
    return f'<div class="bars">{"".join(rows)}<div class="legend">{legend}</div></div>'


def _pairing_box(report: PairingReport | None) -> str:
    if report is None or not report.n_dropped:
        return ""
    items = []
    for label, keys in (
        ("only in A", report.only_a),
        ("only in B", report.only_b),
        ("errored", report.errored),
        ("duplicate in A", report.duplicates_a),
        ("duplicate in B", report.duplicates_b),
    ):
        for k in keys[:50]:
            err = " — ".join(str(k[f]) for f in ("error", "error_a", "error_b") if k.get(f))
            why = f" — {_e(err)}" if err else ""
            items.append(f"<li>{_e(label)}: {_e(k['prompt'])} (seed {_e(k['seed'])}){why}</li>")
        if len(keys) > 50:
            items.append(f"<li>… and {len(keys) - 50} more {_e(label)}</li>")
    return f'<div class="warn"><b>Not compared:</b> {_e(report.summary())}<ul>{"".join(items)}</ul></div>'


def _side(r: ImageRecord, other: ImageRecord, side: str, label: str, files: dict[str, str | None], tie: float) -> str:
    figs = []
    for kind, src in files.items():
        cap = "image" if kind == "image" else f"{kind} heatmap"
        body = f'<img class="{_e(kind)}" src="{_e(src)}" alt="{_e(cap)}">' if src else ""
        body = body or '<div class="missing">missing</div>'
        figs.append(f"<figure>{body}<figcaption>{_e(cap)}</figcaption></figure>")
    rows = "".join(
        f'<tr><td class="name">{_e(n)}</td><td>{v:.3f}</td>'
        + (f"<td>{_signed(v - other.scores[n], tie)}</td>" if side == "b" and n in other.scores else "")
        + "</tr>"
        for n, v in r.scores.items()
    )
    kws = "".join(f'<span class="kw">{_e(k)}</span>' for k in r.keywords) or "none"
    return (
        f'<div class="side {side}"><h3>{_e(side.upper())} · {_e(label)} · seed {_e(r.seed)}</h3>'
        f'<div class="imgs">{"".join(figs)}</div><table class="scores">{rows}</table>'
        f'<p class="keywords">misaligned keywords: {kws}</p></div>'
    )


def _side_files(r: ImageRecord, images: Path, stem: str) -> dict[str, str | None]:
    src = local_path(r.image_uri)
    files: dict[str, str | None] = {"image": _copy(src, images, stem) if src else None}
    for kind in HEATMAP_COLORS:
        if kind in r.heatmap_uris:
            files[kind] = _heatmap_file(r.heatmap_uris[kind], src, kind, images, f"{stem}_{kind}")
    return files


def _prompt_section(
    rank: int,
    p: PromptStats,
    pairs: list[tuple[int, tuple[ImageRecord, ImageRecord]]],
    images: Path,
    labels: tuple[str, str],
    tie: float,
    key: str,
) -> str:
    table = "".join(
        f'<tr><td class="name">{_e(n)}</td><td>{p.mean_a[n]:.3f}</td><td>{p.mean_b[n]:.3f}</td>'
        f"<td>{_signed(p.diff[n], tie)}</td></tr>"
        for n in p.diff
    )
    blocks = []
    for i, (ra, rb) in pairs:
        a = _side(ra, rb, "a", labels[0], _side_files(ra, images, f"p{i:04d}_a"), tie)
        b = _side(rb, ra, "b", labels[1], _side_files(rb, images, f"p{i:04d}_b"), tie)
        blocks.append(f'<div class="pair" data-seed="{_e(ra.seed)}">{a}{b}</div>')
    return (
        f'<section class="prompt" id="prompt-{rank}" data-rank="{rank}" data-diff="{p.diff[key]:.6f}">'
        f"<h2>#{rank} · Δ{_e(key)} {_signed(p.diff[key], tie)} · “{_e(p.prompt)}”</h2>"
        f'<table class="prompt-scores"><tr><th class="name">score</th><th>mean A</th><th>mean B</th><th>d</th></tr>'
        f"{table}</table>{''.join(blocks)}</section>"
    )


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def write_report(
    pairs: Sequence[tuple[ImageRecord, ImageRecord]],
    stats: ComparisonStats,
    out_dir: str | Path,
    *,
    title: str = "Checkpoint comparison",
    label_a: str = "A",
    label_b: str = "B",
    sides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the report folder (``index.html``, ``report.md``, ``comparison.json``, ``images/``); returns the path
    of index.html.

    Args:
        pairs: the ``(a_record, b_record)`` pairs ``stats`` was computed from.
        stats: :func:`compare.stats.compare_scores` of ``pairs``.
        out_dir: the folder to write (created; files of the same name are overwritten, nothing else is removed).
        title, label_a, label_b: page title and checkpoint names (e.g. "before", "after").
        sides: what was asked for, per side: ``{"a": {"generator": name, "lora": adapter path or None}, "b": ...}``
            (a comparison summary's ``a`` and ``b``); shown beside the identities the records carry.
    """
    by_prompt: dict[str, list[tuple[int, tuple[ImageRecord, ImageRecord]]]] = {}
    for i, pair in enumerate(pairs):
        by_prompt.setdefault(pair[0].prompt, []).append((i, pair))
    if set(by_prompt) != {p.prompt for p in stats.prompts} or len(pairs) != stats.n_pairs:
        raise ValueError("pairs and stats disagree (prompts or pair count): compute stats from these pairs")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    stats.write_json(out / "comparison.json")

    described = describe_sides(pairs, sides, (label_a, label_b))
    atomic_write_text(out / "report.md", report_markdown(stats, described, title))
    key = "overall" if "overall" in stats.scores else next(iter(stats.scores))
    th = stats.thresholds
    sections = "".join(
        _prompt_section(rank, p, by_prompt[p.prompt], images, (label_a, label_b), th.tie, key)
        for rank, p in enumerate(stats.prompt_order(key), 1)
    )
    meta = (
        f"A = {_e(label_a)} · B = {_e(label_b)} · {stats.n_pairs} pairs · {len(stats.prompts)} prompts · "
        f"paired bootstrap, {stats.n_boot} resamples, seed {stats.seed} · bins: |d| ≤ {th.tie} ≈, "
        f"≤ {th.strong} &gt;/&lt;, above ≫/≪"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><p class="meta">{meta}</p>'
        f"<h2>A and B</h2>{_sides_table(described)}"
        f"{_pairing_box(stats.pairing)}<h2>Summary</h2>{_summary_table(stats)}{_truth_table(stats)}"
        f"<h2>Five-bin preference (per pair, B vs A)</h2>{_bin_bars(stats)}"
        f"<h2>Prompts, best improvement of {_e(key)} first</h2>{sections}</body></html>\n"
    )
    return atomic_write_text(out / "index.html", page)
