"""Serve asv's published HTML on localhost, open benchmark graph pages in
headless Chromium, check that the graphs rendered, and save a screenshot.

    python tools/dashboard_check.py [--html asv_benches/html] [--bench NAME ...]
                                    [--screenshot PATH] [--chromium PATH]

``tools/dashboard.sh`` runs it after ``asv publish``.  Steps:

1. Offline assets.  asv's ``index.html`` loads jQuery, flot, bootstrap,
   stupidtable and blueimp-md5 from public CDNs, which CI (and most build
   machines) cannot reach; asv then shows its error page.  The tags are
   pointed at copies from Debian's packages (``libjs-jquery``,
   ``libjs-jquery-flot``, ``libjs-bootstrap``, ``libjs-jquery-stupidtable``,
   ``node-blueimp-md5``; /usr/share/javascript) in ``html/vendor/``.
   Debian ships flot 4 (asv was written for 0.8.3): its ``jquery.flot.js``
   bundles the time, selection, categories and axis-label plugins, so their
   separate tags (and asv's own 0.8 axis-label plugin, which would draw the
   labels twice) get an empty file; flot's ``orderBars`` plugin is not
   packaged (grouped bars then overlap, lines are unaffected); flot 4 draws
   its legend in SVG and needs one CSS rule for its background.  A tag whose
   file is missing is left pointing at the CDN (the check below then fails
   where the CDN is unreachable, saying so).
2. A local HTTP server (the html directory, 127.0.0.1, a free port).
3. Per benchmark, ``chromium --headless --dump-dom`` of
   ``index.html#<benchmark>`` after asv's JavaScript ran
   (``--virtual-time-budget``), checked for: not asv's error page; the
   benchmark's graph page; flot's canvases (``flot-base``/``flot-overlay``);
   axis tick labels; and a legend entry per plotted series.  Then a
   screenshot of the first benchmark's page (a PNG, checked for its
   signature and size).

Exit status: 0 rendered; 1 a graph did not render (the reasons printed);
2 bad arguments or no published HTML; 3 Chromium not found.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JS = Path("/usr/share/javascript")

# CDN file name in asv's index.html -> Debian file (None: an empty file)
VENDOR = {
    "jquery-3.3.1.min.js": JS / "jquery" / "jquery.min.js",
    "jquery.flot.min.js": JS / "jquery-flot" / "jquery.flot.js",      # flot 4 bundle
    "jquery.flot.time.min.js": None,                # in the bundle
    "jquery.flot.selection.min.js": None,           # in the bundle
    "jquery.flot.categories.min.js": None,          # in the bundle
    "jquery.flot.orderBars.js": None,               # not packaged: bars overlap
    "stupidtable.min.js": JS / "jquery-stupidtable" / "stupidtable.min.js",
    "md5.min.js": JS / "blueimp-md5" / "md5.min.js",
    "bootstrap.min.js": JS / "bootstrap" / "js" / "bootstrap.min.js",
    "bootstrap.min.css": JS / "bootstrap" / "css" / "bootstrap.min.css",
}
DEBIAN_PACKAGES = ("libjs-jquery libjs-jquery-flot libjs-bootstrap libjs-jquery-stupidtable "
                   "node-blueimp-md5")
MARK = "<!-- kvcache: offline assets (tools/dashboard_check.py) -->"
LEGEND_CSS = ("<style>.legendLayer .background { fill: rgba(255, 255, 255, 0.85); "
              "stroke: rgba(0, 0, 0, 0.85); stroke-width: 1; }</style>")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--hide-scrollbars", "--no-first-run", "--mute-audio"]


def log(msg: str) -> None:
    print(f"dashboard: {msg}", flush=True)


def localize(html: Path) -> list[str]:
    """Point index.html's CDN tags at local copies (idempotent); returns the
    CDN files left as they were (no local copy)."""
    index = html / "index.html"
    text = index.read_text(encoding="utf-8")
    if MARK in text:
        return []
    vendor = html / "vendor"
    vendor.mkdir(exist_ok=True)
    missing: list[str] = []

    def empty(name: str, why: str) -> None:
        (vendor / name).write_text(f"/* {why} (tools/dashboard_check.py) */\n")

    def tag(m: re.Match) -> str:
        whole, url = m.group(0), m.group(1)
        name = url.rsplit("/", 1)[1]
        if name not in VENDOR:
            missing.append(name)
            return whole
        src = VENDOR[name]
        if src is None:
            empty(name, "in Debian's flot bundle, or not packaged")
        elif src.exists():
            shutil.copyfile(src, vendor / name)
        else:
            missing.append(name)
            return whole
        out = whole.replace(url, f"vendor/{name}")
        return re.sub(r'\s+(?:integrity|crossorigin|referrerpolicy)="[^"]*"', "", out)

    text = re.sub(r'<(?:script|link)\b[^>]*?(?:src|href)="(https?://[^"]+\.(?:js|css))"[^>]*>',
                  tag, text)
    if not missing:
        # flot 4's bundle has its own axis-label plugin: asv's would draw them twice
        empty("jquery.flot.axislabels.js", "flot 4 bundles its axis labels")
        text = text.replace('src="jquery.flot.axislabels.js"',
                            'src="vendor/jquery.flot.axislabels.js"')
        text = text.replace("</head>", f"{LEGEND_CSS}\n</head>", 1)
    text = text.replace("<head>", f"<head>\n{MARK}", 1)
    index.write_text(text, encoding="utf-8")
    return missing


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # The browser drops connections it no longer needs (leaving a page
        # for asv's error page, or at the end of its time budget).
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(html: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(html))
    server = _Server(("127.0.0.1", 0), handler)             # port 0: a free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def chromium(exe: str, args: list[str], budget_ms: int, timeout: float) -> str:
    cmd = [exe, *CHROMIUM_FLAGS, f"--virtual-time-budget={budget_ms}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}: {r.stderr[-1500:]}")
    return r.stdout


def check_dom(dom: str, bench: str) -> list[str]:
    """What is wrong with a benchmark's graph page ([] when it rendered)."""
    if "airspeed velocity error" in dom or "failed to load" in dom:
        return ["asv's error page: its JavaScript dependencies did not load (no local copies "
                f"and no CDN access; apt-get install {DEBIAN_PACKAGES})"]
    problems = []
    if bench not in dom:
        problems.append(f"the page does not name {bench}")
    canvases = len(re.findall(r'<canvas[^>]*class="flot-base"', dom))
    if not canvases or not re.search(r'<canvas[^>]*class="flot-overlay"', dom):
        problems.append("no flot canvas: the graph was not drawn")
    ticks = len(re.findall(r'class="[^"]*\bflot-tick-label\b', dom))
    if ticks < 2:
        problems.append(f"{ticks} axis tick labels (a drawn graph has its axes labelled)")
    legend = re.search(r'<svg class="legendLayer"[^>]*>(.*?)</svg>', dom, re.S)   # flot 4
    entries = len(re.findall(r"<text\b", legend.group(1))) if legend else 0
    if not entries:
        problems.append("no legend entry: no series was plotted (no results for it?)")
    if re.search(r'id="error"[^>]*style="[^"]*display:\s*block', dom):
        problems.append("asv's error dialog is shown")
    return problems


def has_graph_data(html: Path, bench: str) -> bool:
    return any(html.joinpath("graphs").rglob(f"{bench}.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, default=ROOT / "asv_benches" / "html")
    ap.add_argument("--bench", action="append", default=None,
                    help="benchmark whose graph page to check (repeatable; default "
                         "update.Update.track_update); the first is the screenshot's")
    ap.add_argument("--screenshot", type=Path, default=None,
                    help="PNG to write (default $KVCACHE_ARTIFACTS/dashboard.png, else "
                         "ci-artifacts/dashboard.png)")
    ap.add_argument("--chromium", default=None, help="the browser (default: chromium on PATH)")
    ap.add_argument("--budget-ms", type=int, default=10000,
                    help="virtual time for asv's JavaScript per page (default 10000)")
    ap.add_argument("--size", default="1400,900", help="screenshot window size")
    args = ap.parse_args(argv)
    benches = args.bench or ["update.Update.track_update"]
    html = args.html.resolve()
    if not (html / "index.html").exists():
        log(f"no published HTML at {html} (run asv publish first)")
        return 2
    exe = args.chromium or next((shutil.which(n) for n in ("chromium", "chromium-browser",
                                                            "google-chrome") if shutil.which(n)),
                                None)
    if not exe:
        log("Chromium not found (apt-get install chromium)")
        return 3
    shot = args.screenshot or Path(os.environ.get("KVCACHE_ARTIFACTS") or
                                   ROOT / "ci-artifacts") / "dashboard.png"
    shot = shot.resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)

    missing = localize(html)
    if missing:
        log(f"no local copy of {', '.join(missing)}: left on the CDN "
            f"(apt-get install {DEBIAN_PACKAGES})")
    failures: dict[str, list[str]] = {}
    index = json.loads((html / "index.json").read_text())
    server, base = serve(html)
    try:
        for bench in benches:
            if bench not in index.get("benchmarks", {}):
                failures[bench] = ["not a published benchmark (see asv_benches/html/index.json)"]
                continue
            if not has_graph_data(html, bench):
                failures[bench] = ["asv publish wrote no graph data for it (no results?)"]
                continue
            dom = chromium(exe, ["--dump-dom", f"{base}#{bench}"], args.budget_ms, 180)
            problems = check_dom(dom, bench)
            if problems:
                failures[bench] = problems
            else:
                log(f"{bench}: graph rendered")
        chromium(exe, [f"--screenshot={shot}", f"--window-size={args.size}",
                       f"{base}#{benches[0]}"], args.budget_ms, 180)
    finally:
        server.shutdown()
    data = shot.read_bytes() if shot.exists() else b""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 10_000:
        failures.setdefault("screenshot", []).append(
            f"{shot}: not a plausible PNG ({len(data)} bytes)")
    else:
        log(f"screenshot of {benches[0]}: {shot} ({len(data) // 1024} KiB)")
    if failures:
        log("FAILED: the benchmark graphs did not render:")
        for bench, problems in failures.items():
            for p in problems:
                print(f"  {bench}: {p}", flush=True)
        return 1
    log(f"ok: {len(benches)} graph page(s) rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
