"""tools/dashboard_check.py's own logic, without a browser: the rewrite of
asv's CDN tags to local copies, and the DOM checks that decide whether a
benchmark graph rendered (a rendered page passes, each way of not rendering
is reported).  The browser run itself is tools/dashboard.sh's (a CI step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kvhelpers import tool_module

TOOL = Path(__file__).resolve().parents[1] / "tools" / "dashboard_check.py"


@pytest.fixture(scope="module")
def dc():
    return tool_module("dashboard_check")


INDEX = """<html><head>
<script src="https://code.jquery.com/jquery-3.3.1.min.js" integrity="sha256-x" crossorigin="anonymous" onerror="js_load_failure()"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js" integrity="sha512-y" crossorigin="anonymous" referrerpolicy="no-referrer" onerror="js_load_failure()"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js" onerror="js_load_failure()"></script>
<script language="javascript" type="text/javascript" src="jquery.flot.axislabels.js"></script>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css" integrity="sha256-z" crossorigin="anonymous">
</head><body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body></html>
"""  # noqa: E501


def _fake_debian(dc, tmp_path, monkeypatch, present=True):
    js = tmp_path / "js"
    vendor = {}
    for name, src in dc.VENDOR.items():
        if src is None:
            vendor[name] = None
            continue
        path = js / src.relative_to(dc.JS)
        if present:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"/* {name} */")
        vendor[name] = path
    monkeypatch.setattr(dc, "VENDOR", vendor)


def test_localize_points_tags_at_local_copies(dc, tmp_path, monkeypatch):
    _fake_debian(dc, tmp_path, monkeypatch)
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text(INDEX)
    assert dc.localize(html) == []
    text = (html / "index.html").read_text()
    for name in ("jquery-3.3.1.min.js", "jquery.flot.min.js", "jquery.flot.time.min.js",
                 "bootstrap.min.css", "jquery.flot.axislabels.js"):
        assert f'"vendor/{name}"' in text, name
        assert (html / "vendor" / name).exists(), name
    assert (html / "vendor" / "jquery.flot.min.js").read_text() == "/* jquery.flot.min.js */"
    # no CDN left, no integrity hash of the CDN's file on the local one
    assert "https://code.jquery.com" not in text and "cdnjs" not in text
    assert "integrity=" not in text and "crossorigin" not in text
    assert 'onerror="js_load_failure()"' in text         # asv's own fallback kept
    assert "https://github.com/airspeed-velocity/asv/" in text     # links untouched
    assert ".legendLayer .background" in text
    # idempotent: a second run changes nothing
    assert dc.localize(html) == []
    assert (html / "index.html").read_text() == text


def test_localize_without_the_packages_leaves_the_cdn(dc, tmp_path, monkeypatch):
    _fake_debian(dc, tmp_path, monkeypatch, present=False)
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text(INDEX)
    missing = dc.localize(html)
    assert set(missing) == {"jquery-3.3.1.min.js", "jquery.flot.min.js", "bootstrap.min.css"}
    text = (html / "index.html").read_text()
    assert "https://code.jquery.com/jquery-3.3.1.min.js" in text
    assert 'src="jquery.flot.axislabels.js"' in text     # asv's plugin kept for CDN flot 0.8


BENCH = "update.Update.time_update"
RENDERED = f"""<html><body><li class="active">{BENCH}</li>
<div id="main-graph"><canvas class="flot-base" width="5"></canvas>
<canvas class="flot-overlay" width="5"></canvas>
<div class="flot-tick-label tickLabel">0.00</div><div class="flot-tick-label tickLabel">10.0</div>
<div class="legend"><svg class="legendLayer" style=""><rect class="background"></rect>
<g><text x="3px"><tspan>context-128; impl-kvcache</tspan></text></g></svg></div></div>
<div class="modal fade" id="error" tabindex="-1"></div></body></html>"""


def test_check_dom_rendered(dc):
    assert dc.check_dom(RENDERED, BENCH) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.replace('class="flot-base"', 'class="x"'), "no flot canvas"),
    (lambda d: d.replace("flot-tick-label", "x"), "axis tick labels"),
    (lambda d: d.replace("<text", "<x"), "no legend entry"),
    (lambda d: d.replace(BENCH, "other"), "does not name"),
    (lambda d: d.replace('id="error" tabindex', 'id="error" style="display: block" tabindex'),
     "error dialog"),
    (lambda d: "<title>airspeed velocity error</title> failed to load", "error page"),
])
def test_check_dom_not_rendered(dc, edit, problem):
    problems = dc.check_dom(edit(RENDERED), BENCH)
    assert any(problem in p for p in problems), problems


def test_main_without_html_or_browser(dc, tmp_path, monkeypatch, capsys):
    assert dc.main(["--html", str(tmp_path)]) == 2
    assert "no published HTML" in capsys.readouterr().out
    (tmp_path / "index.html").write_text(INDEX)
    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    assert dc.main(["--html", str(tmp_path)]) == 3
    assert "Chromium not found" in capsys.readouterr().out
