"""compare.report: the folder's files, escaping, heatmap overlays, and the page as headless Chromium renders it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from common.names import SCORE_NAMES
from common.records import ImageRecord
from compare.report import OVERLAY_ALPHA, heatmap_overlay, load_heatmap, write_report
from compare.stats import compare_scores, pair_records

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
TRICKY = 'a <b>bold</b> & "quoted" cat'
# prompt -> overall difference B − A (the page must order them best first)
PROMPTS = {"a red cube on the left": 0.0, TRICKY: 0.3, "two blue spheres": -0.2}


def draw(path: Path, color: tuple[int, int, int], seed: int) -> str:
    im = Image.new("RGB", (64, 64), color)
    d = ImageDraw.Draw(im)
    d.ellipse((8 + 4 * seed, 8, 40 + 4 * seed, 40), fill=(255 - color[0], 200, 40 * seed % 256))
    d.rectangle((30, 36, 60, 60), fill=(20, 20, 20))
    im.save(path)
    return str(path)


def make_run(root: Path):
    """3 prompts × 2 seeds, B and A differ by PROMPTS[prompt] on every score; one .npy heatmap, one .png overlay,
    keywords on some records, and one extra errored pair."""
    root.mkdir(parents=True, exist_ok=True)
    a, b = [], []
    for p, (prompt, delta) in enumerate(PROMPTS.items()):
        for seed in range(2):
            base = 0.4 + 0.05 * seed
            for side, out, shift, color in (("a", a, 0.0, (90, 120, 200)), ("b", b, delta, (200, 140, 90))):
                img = draw(root / f"{side}{p}{seed}.png", color, seed + p)
                scores = {n: base + shift for n in SCORE_NAMES}
                out.append(
                    ImageRecord(f"{side}{p}{seed}", prompt, seed, {"backend": side}, image_uri=img, scores=scores)
                )
    heat = np.zeros((16, 16), np.float32)
    heat[4:12, 4:12] = 1.0
    np.save(root / "heat.npy", heat)
    a[0].heatmap_uris = {"implausibility": str(root / "heat.npy")}
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "overlay.png")
    b[0].heatmap_uris = {"implausibility": "file://" + str(root / "overlay.png")}
    a[2].keywords = ["cube", "<left>"]
    a.append(ImageRecord("bad-a", "broken prompt", 0, {}, scores={"overall": 0.5}))
    b.append(ImageRecord("bad-b", "broken prompt", 0, {}, error="generation failed"))
    return pair_records(a, b)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    pairs = make_run(root / "run")
    stats = compare_scores(pairs, n_boot=200)
    index = write_report(pairs, stats, root / "out", title="A vs <B>", label_a="base", label_b="finetuned")
    return pairs, stats, index


def test_folder_files_and_json(report):
    pairs, stats, index = report
    out = index.parent
    assert index.name == "index.html"
    assert json.loads((out / "comparison.json").read_text()) == json.loads(json.dumps(stats.to_dict()))
    # 12 images, one .npy overlay rendered, one .png overlay copied
    assert len(list((out / "images").glob("p*_[ab].png"))) == 12
    assert sorted(p.name for p in (out / "images").glob("*_implausibility.png")) == [
        "p0000_a_implausibility.png",
        "p0000_b_implausibility.png",
    ]
    assert (out / "images" / "p0000_a.png").read_bytes() == Path(pairs[0][0].image_uri).read_bytes()


def test_page_is_self_contained_and_escaped(report):
    text = report[2].read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; cat" in text and TRICKY not in text
    assert "&lt;left&gt;" in text and "A vs &lt;B&gt;" in text
    assert "generation failed" in text and "1 errored" in text


def test_heatmap_overlay_values(tmp_path):
    gray = Image.new("RGB", (4, 2), (128, 128, 128))
    m = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    out = np.asarray(heatmap_overlay(gray, m, (255, 0, 0))).astype(int)
    full = (round(128 * (1 - OVERLAY_ALPHA) + 255 * OVERLAY_ALPHA), round(128 * (1 - OVERLAY_ALPHA)))
    assert tuple(out[0, 0]) == (full[0], full[1], full[1]) and tuple(out[1, 3]) == tuple(out[0, 0])
    assert tuple(out[0, 2]) == (128, 128, 128)
    half = 128 * (1 - OVERLAY_ALPHA / 2)
    assert tuple(out[0, 1]) == (round(half + 255 * OVERLAY_ALPHA / 2), round(half), round(half))
    np.save(tmp_path / "bad.npy", np.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="must be \\(H, W\\)"):
        load_heatmap(tmp_path / "bad.npy")
    np.save(tmp_path / "big.npy", np.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        load_heatmap(tmp_path / "big.npy")


def test_mismatched_stats_rejected(report, tmp_path):
    pairs, stats, _ = report
    with pytest.raises(ValueError, match="pairs and stats disagree"):
        write_report(pairs[:2], stats, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium
# ---------------------------------------------------------------------------------------------------------


class DomSummary(HTMLParser):
    """The parts of a rendered DOM the test checks: images, prompt sections, summary rows, bar segments."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.sections: list[str] = []
        self.summary_rows: list[str] = []
        self.segments: list[str] = []
        self.tags_in_h2: list[str] = []
        self.h2_text: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.imgs.append(a)
        if tag == "section" and "prompt" in a.get("class", ""):
            self.sections.append(a["data-rank"])
        if tag == "tr" and "data-score" in a:
            self.summary_rows.append(a["data-score"])
        if tag == "div" and "seg" in a.get("class", "").split():
            self.segments.append(a.get("style", ""))
        if self._in_h2:
            self.tags_in_h2.append(tag)
        if tag == "h2":
            self._in_h2 = True
            self.h2_text.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2_text[-1] += data


def chromium(runs: list[tuple[Path, list[str]]], tmp: Path) -> list[subprocess.CompletedProcess]:
    """Headless Chromium once per (page, extra args), all started at once, each with its own profile folder."""
    procs = []
    for i, (page, args) in enumerate(runs):
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / f'profile{i}'}", *args, page.as_uri()]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def page_errors(stderr: str) -> list[str]:
    """Console messages and uncaught errors of the page (Chromium logs them as INFO:CONSOLE lines)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def rendered(report, tmp_path_factory):
    """(DOM dump, screenshot run, screenshot path, run of a page that throws) of the report page."""
    if CHROMIUM is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install -y chromium)")
    tmp = tmp_path_factory.mktemp("chromium")
    bad = tmp / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><script>throw new Error("boom")</script></body></html>')
    index = report[2]
    shot_args = [f"--screenshot={tmp / 'page.png'}", "--window-size=1200,1600"]
    dom, shot, thrown = chromium([(index, ["--dump-dom"]), (index, shot_args), (bad, ["--dump-dom"])], tmp)
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    return dom, shot, tmp / "page.png", thrown


def test_console_check_catches_errors(rendered):
    assert any("Uncaught Error: boom" in e for e in page_errors(rendered[3].stderr))


def test_rendered_page_has_no_console_errors(rendered):
    dom, shot = rendered[:2]
    assert page_errors(dom.stderr) == [] and page_errors(shot.stderr) == []


def test_rendered_dom_content(report, rendered):
    index = report[2]
    s = DomSummary()
    s.feed(rendered[0].stdout)
    assert s.summary_rows == list(SCORE_NAMES)
    assert len(s.segments) == 5 * len(SCORE_NAMES)
    assert s.sections == ["1", "2", "3"]
    prompts_in_order = sorted(PROMPTS, key=lambda p: -PROMPTS[p])
    prompt_h2 = [t for t in s.h2_text if t.startswith("#")]
    assert [t.split("“", 1)[1].rstrip("”") for t in prompt_h2] == prompts_in_order
    assert s.tags_in_h2.count("b") == 0  # the prompt's <b> is text, not markup
    kinds = [i["class"] for i in s.imgs]
    assert kinds.count("image") == 12 and kinds.count("implausibility") == 2
    for img in s.imgs:
        assert not img["src"].startswith(("/", "file:", "http")) and (index.parent / img["src"]).is_file()
    # per score: 2 pairs at +0.3 (≫), 2 at 0 (≈), 2 at −0.2 (≪) -> widths 1/3, 0, 1/3, 0, 1/3
    widths = [float(re.search(r"width:([0-9.]+)%", seg).group(1)) for seg in s.segments]
    assert widths == pytest.approx([100 / 3, 0, 100 / 3, 0, 100 / 3] * len(SCORE_NAMES), abs=1e-3)


def test_screenshot_is_not_blank(rendered):
    im = np.asarray(Image.open(rendered[2]).convert("RGB"))
    assert im.shape == (1600, 1200, 3)
    colors = np.unique((im[..., 0].astype(np.int32) << 16) | (im[..., 1].astype(np.int32) << 8) | im[..., 2])
    assert im.std() > 20 and len(colors) > 100


def test_a_stored_grayscale_heatmap_is_drawn_as_an_overlay(tmp_path):
    from compare.report import _heatmap_file

    image = tmp_path / "img.png"
    Image.new("RGB", (16, 16), (0, 0, 255)).save(image)
    m = np.zeros((8, 8), np.uint8)
    m[:4, :4] = 255  # the top-left quarter is hot
    Image.fromarray(m).save(tmp_path / "heat.png")
    (tmp_path / "out").mkdir()
    rel = _heatmap_file(str(tmp_path / "heat.png"), image, "implausibility", tmp_path / "out", "h")
    out = np.asarray(Image.open(tmp_path / "out" / Path(rel).name).convert("RGB"), np.int16)
    assert out.shape == (16, 16, 3)
    assert out[2, 2, 0] > out[12, 12, 0] and tuple(out[12, 12]) == (0, 0, 255)  # hot: tinted; cold: the image


# ---------------------------------------------------------------------------------------------------------
# A and B named; ties shown as ties
# ---------------------------------------------------------------------------------------------------------


def tie_run(root: Path):
    """4 prompts × 2 seeds. B − A: overall −0.0001 everywhere (rounds to 0), plausibility +0.06 / −0.04
    alternating (interval includes 0), aesthetics +0.1, alignment −0.1. B carries a LoRA adapter hash."""
    root.mkdir(parents=True, exist_ok=True)
    base = {"backend": "synthetic", "model": "synthetic-world", "revision": "v1", "adapter_hash": None}
    tuned = {**base, "adapter_hash": "0123456789abcdef"}
    a, b = [], []
    for p in range(4):
        for seed in range(2):
            sign = 1 if (p + seed) % 2 else -1
            sa = {"plausibility": 0.5, "alignment": 0.6, "aesthetics": 0.4, "overall": 0.5}
            sb = {"plausibility": 0.51 + 0.05 * sign, "alignment": 0.5, "aesthetics": 0.5, "overall": 0.4999}
            for side, out, gen, sc in (("a", a, base, sa), ("b", b, tuned, sb)):
                img = draw(root / f"{side}{p}{seed}.png", (90, 120, 200), seed)
                out.append(ImageRecord(f"{side}{p}{seed}", f"prompt {p}", seed, gen, image_uri=img, scores=sc))
    return pair_records(a, b)


def summary_cells(html_text: str) -> dict[str, str]:
    """score -> the d cell's inner HTML of the summary table."""
    table = html_text.split('<table class="summary">')[1].split("</table>")[0]
    return dict(
        re.findall(r'<tr data-score="(\w+)"><td class="name">\w+</td><td>[^<]*</td><td>[^<]*</td><td>(.*?)</td>', table)
    )


def test_report_names_a_and_b_and_shows_ties(tmp_path):
    pairs = tie_run(tmp_path / "run")
    stats = compare_scores(pairs, n_boot=500)
    assert stats.scores["plausibility"].ci_low < 0 < stats.scores["plausibility"].ci_high
    assert stats.scores["overall"].ci_high < 0  # a real but invisible difference: −0.0001
    sides = {"a": {"generator": "synthetic", "lora": None}, "b": {"generator": "synthetic", "lora": "runs/x/adapter"}}
    index = write_report(pairs, stats, tmp_path / "out", label_a="before", label_b="after", sides=sides)
    text = index.read_text()
    rows = dict(re.findall(r'<tr data-side="(\w)">(.*?)</tr>', text))
    assert rows["a"] == (
        '<th>A</th><td>before</td><td class="generator">synthetic (synthetic:synthetic-world@v1)</td>'
        '<td class="adapter">none</td>'
    )
    assert rows["b"].endswith('<td class="adapter">runs/x/adapter · hash 0123456789abcdef</td>')
    assert text.index('class="sides"') < text.index('class="summary"')  # named at the top

    cells = summary_cells(text)
    assert cells["overall"] == '<span class="zero tie" title="rounds to 0.000">0.000 · tie</span>'
    assert re.fullmatch(
        r'<span class="zero tie" title="95 % interval includes 0">[+-]0\.0\d\d · tie</span>', cells["plausibility"]
    )
    assert cells["aesthetics"] == '<span class="pos">+0.100</span>'
    assert cells["alignment"] == '<span class="neg">-0.100</span>'
    visible = re.sub(r"<[^>]*>", " ", text)
    assert "-0.000" not in visible and "+0.000" not in visible  # intervals, per-prompt and per-seed differences too
    assert (
        visible.count("0.000") == 1 + 2 + 4 + 4 + 8
    )  # overall: summary d, interval; 4 prompts (title, table); 8 seeds

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| A | before | synthetic (synthetic:synthetic-world@v1) | none |" in md
    assert "| B | after | synthetic (synthetic:synthetic-world@v1) | runs/x/adapter · hash 0123456789abcdef |" in md
    overall = next(line for line in md.splitlines() if line.startswith("| overall |"))
    assert "| 0.000 (tie) |" in overall
    assert "| +0.100 |" in next(line for line in md.splitlines() if line.startswith("| aesthetics |"))


def test_report_names_sides_from_the_records_alone(report):
    text = report[2].read_text()
    rows = dict(re.findall(r'<tr data-side="(\w)">(.*?)</tr>', text))
    assert '<td>base</td><td class="generator">a</td><td class="adapter">none</td>' in rows["a"]
    assert '<td>finetuned</td><td class="generator">b</td>' in rows["b"]


def test_truth_table_beside_rahf_only_when_the_records_have_truth(tmp_path, report):
    a, b = [], []
    for seed, (ta, tb) in enumerate([(0.4, 0.6), (0.6, 0.6)]):
        for side, out, v, t in (("a", a, 0.5, ta), ("b", b, 0.6, tb)):
            truth = {"scores": {n: t for n in SCORE_NAMES}, "implausible_area": 0.2 if side == "a" else 0.1}
            scores = {n: v for n in SCORE_NAMES}
            out.append(ImageRecord(f"{side}{seed}", "p", seed, {"backend": side}, scores=scores, truth=truth))
    pairs = pair_records(a, b)
    stats = compare_scores(pairs, n_boot=200)
    index = write_report(pairs, stats, tmp_path / "out")
    text = index.read_text()
    table = text[text.index('<table class="truth">') :]
    table = table[: table.index("</table>")]
    row = table[table.index('data-score="overall"') :]
    row = row[: row.index("</tr>")]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    plain = [re.sub(r"<[^>]+>", "", c) for c in cells]
    # RAHF: 0.5 -> 0.6 on both pairs; truth: 0.5 -> 0.6, differences 0.2 and 0.0
    assert plain[:6] == ["overall", "0.500", "0.600", "+0.100", "[+0.100, +0.100]", "0.500"]
    assert plain[6:] == ["0.600", "+0.100 · tie", "[0.000, +0.200]"]
    area = table[table.index('data-score="implausible_area"') :]
    assert "–" in area[: area.index("</tr>")] and "-0.100" in area[: area.index("</tr>")]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "true" in md and "| overall | 0.500 | 0.600 | +0.100 | [+0.100, +0.100] | 0.500 | 0.600 |" in md
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["truth"]["scores"]["overall"]["diff"] == pytest.approx(0.1)
    # the module's run has no truth: no truth table
    plain_page = report[2].read_text()
    assert 'class="truth"' not in plain_page and "true" not in (report[2].parent / "report.md").read_text()
