"""`towerlab report`: the page is self-contained (no scripts, styles or images from elsewhere), headless Chromium with
networking off renders every plot at a nonzero size, the table has one row per configuration, the page is logged to
the parent run, plots of axes the sweep did not vary are left out, and a file towerlab did not write is never
overwritten."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import pytest

from towerlab.cli import main
from towerlab.tracking import report, study

from sweep_store_testing import CONFIGS, sweep_store  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("restore_signals")

# Run in the page after layout: each figure's SVG gets its rendered size and its number of drawn shapes as attributes,
# which --dump-dom then shows (a DOM dump cannot be asked anything else).
PROBE = """<script>for (const f of document.querySelectorAll('figure.plot')) {
  const s = f.querySelector('svg'), r = s ? s.getBoundingClientRect() : {width: 0, height: 0};
  f.setAttribute('data-w', r.width); f.setAttribute('data-h', r.height);
  f.setAttribute('data-shapes', s ? s.querySelectorAll('path, line, rect, use').length : 0);
}</script>"""


@pytest.fixture(scope="module")
def page(sweep_store):  # noqa: F811
    out = sweep_store["tmp"] / "out" / "report.html"
    assert main(["report", "--sweep", "study", "--tracking-uri", sweep_store["uri"], "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # Chromium alone takes about 4-7 s on a shared 2-core machine
def test_chromium_renders_every_plot_offline(page, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed: apt-get install -y chromium"
    text = page.read_text()
    # the SVGs' url(#id) point inside the page; anything else would be fetched
    assert not re.search(r"<script|<link|\bsrc=|@import|url\(\s*['\"]?(?!#)", text), "the page must load nothing"
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--disable-background-networking", "--proxy-server=http://127.0.0.1:9",  # no network
                          "--proxy-bypass-list=<-loopback>", "--window-size=1200,900", "--dump-dom",
                          probed.as_uri()], capture_output=True, text=True, timeout=120).stdout
    figures = re.findall(r'<figure class="plot" data-plot="([^"]+)" data-w="([\d.]+)" data-h="([\d.]+)" '
                         r'data-shapes="(\d+)"', dom)
    assert [f[0] for f in figures] == ["vs-loss.temperature_init", "vs-data.global_batch", "curves", "geometry"], \
        dom[-2000:]
    for name, w, h, shapes in figures:
        assert float(w) > 100 and float(h) > 100 and int(shapes) > 10, (name, w, h, shapes)
    assert len(re.findall(r'<tr class="config', dom)) == len(CONFIGS)


def test_the_page_says_what_was_tested_and_is_logged(page, sweep_store):  # noqa: F811
    text = html.unescape(page.read_text())
    assert "Welch's t, Holm-corrected over 15 pairs, alpha 0.05" in text
    assert "stopped early while still improving" in text and "final (last logged) value" in text
    assert "is not a server, so runs are listed by id" in text  # a sqlite store: no UI links to give
    for ids in sweep_store["runs"].values():
        assert all(i in text for i in ids)
    arts = {a.path for a in sweep_store["client"].list_artifacts(sweep_store["parent"])}
    assert "report.html" in arts


def test_links_go_to_the_mlflow_ui_of_a_server():
    assert report.run_link("http://mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert report.run_link("sqlite:///x.db", "3", "abc") is None


def test_axes_the_sweep_did_not_vary_are_left_out(sweep_store):  # noqa: F811
    s = study.load(sweep_store["uri"], "study")
    s.configs = [g for g in s.configs if g.params["data.global_batch"] == "32"]  # temperature varies, batch not
    page = report.render(s, sweep_store["uri"])
    assert 'data-plot="vs-loss.temperature_init"' in page and 'data-plot="curves"' in page
    assert "vs-data.global_batch" not in page


def test_a_file_towerlab_did_not_write_is_not_overwritten(page, sweep_store, capsys):  # noqa: F811
    foreign = page.parent / "notes.html"
    foreign.write_text("<html>my notes</html>")
    assert main(["report", "--sweep", "study", "--tracking-uri", sweep_store["uri"], "--out", str(foreign)]) == 2
    assert "notes.html exists and is not a towerlab report" in capsys.readouterr().err
    assert foreign.read_text() == "<html>my notes</html>"
    before = page.stat().st_mtime_ns
    assert main(["report", "--sweep", "study", "--tracking-uri", sweep_store["uri"], "--out", str(page)]) == 0
    assert page.stat().st_mtime_ns > before  # its own report is replaced
