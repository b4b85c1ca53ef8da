"""The live soup page: server-rendered HTML with inline SVG, and a small server for it during a sweep (no Ray).

``render_page(snapshot)`` turns the plain dict of :func:`soup_ray.live.snapshot`
into one self-contained HTML page (no script, style or font from anywhere
else, so it works offline): the soup's version, ingredients and held-out
accuracy, the greedy curve, the test vs mean-shift scatter and the trial
table. Every piece of text is escaped. A few lines of inline JavaScript poll
``soup.json`` and, when its ``digest`` changes, fetch the page again and swap
its ``#live`` part in; without JavaScript a meta refresh reloads the page.

The Serve ingress answers ``GET /`` and ``GET /soup.json`` with these;
``start_live_page`` serves the same two from a standard-library HTTP server
thread, for a sweep that is running before anything is served.
"""

from __future__ import annotations

import html
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .live import snapshot

DEFAULT_POLL_S = 2.0
JSON_PATH = "soup.json"

KIND_STYLE = {  # marker, fill colour, legend label
    "individual": ("circle", "#9aa0a6", "fine-tuned model"),
    "soup": ("square", "#e8710a", "soup"),
    "ensemble": ("triangle", "#1e8e3e", "ensemble"),
    "recipe": ("diamond", "#12b5cb", "recipe"),
}
HIGHLIGHT = {"greedy_soup": "#d93025"}


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def pct(v: Any, digits: int = 1) -> str:
    return "–" if not isinstance(v, (int, float)) or v != v else f"{100 * float(v):.{digits}f}%"


def _sci(v: Any) -> str:
    return f"{float(v):.1e}" if isinstance(v, (int, float)) else "–"


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))


# ---------------------------------------------------------------- SVG pieces


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (at most ``most`` + 1 of them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / most
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, t = [], first
    while t <= hi + 1e-9 and len(out) <= most + 1:
        out.append(round(t, 10))
        t += step
    return out


def _fmt_tick(v: float) -> str:
    return f"{v:g}"


class Plot:
    """A linear x/y mapping into an SVG box with axes, ticks and labels."""

    def __init__(
        self,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        width: int = 520,
        height: int = 330,
        margin: tuple[int, int, int, int] = (18, 16, 44, 54),
    ) -> None:
        self.w, self.h = width, height
        self.top, self.right, self.bottom, self.left = margin
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.parts: list[str] = []

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (v - self.x0) / span * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.h - self.bottom - (v - self.y0) / span * (self.h - self.top - self.bottom)

    def axes(self, xlabel: str, ylabel: str, xticks: list[float], yticks: list[float]) -> None:
        p = self.parts
        x_left, x_right = self.left, self.w - self.right
        y_top, y_bottom = self.top, self.h - self.bottom
        for t in yticks:
            yy = self.y(t)
            p.append(f'<line x1="{x_left}" y1="{yy:.1f}" x2="{x_right}" y2="{yy:.1f}" class="grid"/>')
            p.append(
                f'<text x="{x_left - 6}" y="{yy + 4:.1f}" text-anchor="end" class="tick">{esc(_fmt_tick(t))}</text>'
            )
        for t in xticks:
            xx = self.x(t)
            p.append(f'<line x1="{xx:.1f}" y1="{y_top}" x2="{xx:.1f}" y2="{y_bottom}" class="grid"/>')
            p.append(
                f'<text x="{xx:.1f}" y="{y_bottom + 16}" text-anchor="middle" class="tick">{esc(_fmt_tick(t))}</text>'
            )
        p.append(
            f'<rect x="{x_left}" y="{y_top}" width="{x_right - x_left}" height="{y_bottom - y_top}" class="frame"/>'
        )
        p.append(
            f'<text x="{(x_left + x_right) / 2:.1f}" y="{self.h - 8}" text-anchor="middle" class="label">'
            f"{esc(xlabel)}</text>"
        )
        p.append(
            f'<text transform="translate(14 {(y_top + y_bottom) / 2:.1f}) rotate(-90)" text-anchor="middle" '
            f'class="label">{esc(ylabel)}</text>'
        )

    def marker(
        self,
        shape: str,
        cx: float,
        cy: float,
        fill: str,
        title: str,
        r: float = 4.5,
        hollow: bool = False,
        cls: str = "pt",
    ) -> None:
        style = (
            f'fill="none" stroke="{fill}" stroke-width="1.6"'
            if hollow
            else f'fill="{fill}" stroke="#202124" stroke-width="0.6"'
        )
        tip = f"<title>{esc(title)}</title>"
        if shape == "square":
            body = f'<rect x="{cx - r:.1f}" y="{cy - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {style}/>'
        elif shape == "triangle":
            pts = f"{cx:.1f},{cy - r * 1.2:.1f} {cx - r * 1.1:.1f},{cy + r * 0.9:.1f} {cx + r * 1.1:.1f},{cy + r * 0.9:.1f}"
            body = f'<polygon points="{pts}" {style}/>'
        elif shape == "diamond":
            pts = (
                f"{cx:.1f},{cy - r * 1.25:.1f} {cx + r:.1f},{cy:.1f} {cx:.1f},{cy + r * 1.25:.1f} {cx - r:.1f},{cy:.1f}"
            )
            body = f'<polygon points="{pts}" {style}/>'
        else:
            body = f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" {style}/>'
        self.parts.append(f'<g class="{esc(cls)}">{tip}{body}</g>')

    def svg(self, label: str, cls: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.w} {self.h}" width="{self.w}" '
            f'height="{self.h}" role="img" aria-label="{esc(label)}" class="{esc(cls)}">'
            + "".join(self.parts)
            + "</svg>"
        )


def _padded(values: list[float], pad: float = 0.06, floor: float = 0.5) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = max(hi - lo, floor)
    return lo - pad * span, hi + pad * span


def greedy_svg(curve: list[dict[str, Any]]) -> str:
    """Candidates in held-out order (kept: filled, not kept: hollow) and the soup's held-out after each step."""
    pts = [c for c in curve if isinstance(c.get("position"), int)]
    if not pts:
        return '<p class="empty" id="greedy-empty">No candidate has reached the soup actor yet.</p>'
    ys = [100 * v for c in pts for v in (c.get("heldout"), c.get("soup_heldout")) if isinstance(v, (int, float))]
    y0, y1 = _padded(ys or [0.0, 100.0])
    n = max(c["position"] for c in pts)
    plot = Plot((-0.5, n + 0.5), (y0, y1))
    step = max(1, math.ceil((n + 1) / 12))
    plot.axes("candidate (held-out order)", "held-out accuracy (%)", list(range(0, n + 1, step)), nice_ticks(y0, y1))
    soup_pts = [
        (plot.x(c["position"]), plot.y(100 * c["soup_heldout"]))
        for c in pts
        if isinstance(c.get("soup_heldout"), (int, float))
    ]
    if soup_pts:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in soup_pts)
        plot.parts.append(
            f'<polyline points="{path}" class="soup-line"><title>soup held-out after each step</title></polyline>'
        )
    for c in pts:
        if not isinstance(c.get("heldout"), (int, float)):
            continue
        kept = bool(c.get("accepted"))
        title = (
            f"#{c['position']} trial {c.get('trial_id')}: held-out {pct(c['heldout'], 2)}, "
            f"{'kept' if kept else 'not kept'}; soup after: {pct(c.get('soup_heldout'), 2)}"
        )
        plot.marker(
            "circle",
            plot.x(c["position"]),
            plot.y(100 * c["heldout"]),
            "#1e8e3e" if kept else "#d93025",
            title,
            hollow=not kept,
            cls="kept" if kept else "dropped",
        )
    return plot.svg("greedy soup curve", "chart greedy")


def _view(points: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The points drawn and how many were left out: once soups are scored, the individual models in the lowest
    quarter on either axis (below the soups as well) are left out, so the weak tail does not squeeze the soups
    into a corner."""
    soups = [p for p in points if p.get("kind") != "individual"]
    singles = [p for p in points if p.get("kind") == "individual"]
    if not soups or len(singles) < 4:
        return points, 0

    def quartile(vals: list[float]) -> float:
        return sorted(vals)[len(vals) // 4]

    lo_x = min(min(p["test"] for p in soups), quartile([p["test"] for p in singles]))
    lo_y = min(min(p["shift_mean"] for p in soups), quartile([p["shift_mean"] for p in singles]))
    shown = [p for p in points if p.get("kind") != "individual" or (p["test"] >= lo_x and p["shift_mean"] >= lo_y)]
    return shown, len(points) - len(shown)


def scatter_svg(points: list[dict[str, Any]]) -> str:
    """Test accuracy (x) against mean shift accuracy (y) of every model and soup scored so far.

    Soups, ensembles and recipes carry their number in :func:`soups_table`."""
    pts = [
        p for p in points if isinstance(p.get("test"), (int, float)) and isinstance(p.get("shift_mean"), (int, float))
    ]
    if not pts:
        return '<p class="empty" id="scatter-empty">No model has test and shift accuracies yet.</p>'
    shown, hidden = _view(pts)
    x0, x1 = _padded([100 * p["test"] for p in shown])
    y0, y1 = _padded([100 * p["shift_mean"] for p in shown])
    plot = Plot((x0, x1), (y0, y1))
    plot.axes("test accuracy (%)", "mean shift accuracy (%)", nice_ticks(x0, x1), nice_ticks(y0, y1))
    numbers = {id(p): i for i, p in enumerate((p for p in pts if p.get("kind") != "individual"), 1)}
    order = {"individual": 0, "recipe": 1, "ensemble": 2, "soup": 3}
    for p in sorted(shown, key=lambda q: order.get(q.get("kind", ""), 1)):
        shape, fill, _ = KIND_STYLE.get(p.get("kind", ""), KIND_STYLE["soup"])
        fill = HIGHLIGHT.get(str(p.get("name")), fill)
        cx, cy = plot.x(100 * p["test"]), plot.y(100 * p["shift_mean"])
        individual = p.get("kind") == "individual"
        tag = "" if individual else f"{numbers[id(p)]}. "
        title = f"{tag}{p.get('name')}: test {pct(p['test'], 2)}, shift mean {pct(p['shift_mean'], 2)}"
        plot.marker(shape, cx, cy, fill, title, r=3.5 if individual else 5.5, cls=f"pt {p.get('kind', '')}")
        if not individual:
            plot.parts.append(f'<text x="{cx + 6:.1f}" y="{cy - 5:.1f}" class="pt-label">{numbers[id(p)]}</text>')
    note = (
        (
            f'<p class="muted small" id="scatter-hidden">{hidden} weaker model(s) (lowest quarter) lie outside '
            "this view (the trial table lists them)</p>"
        )
        if hidden
        else ""
    )
    return plot.svg("test vs mean shift accuracy", "chart scatter") + note


def soups_table(points: list[dict[str, Any]]) -> str:
    """The numbered soups, ensembles and recipes of the scatter with their scores."""
    rows = [p for p in points if p.get("kind") != "individual"]
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{i}</td><td>{esc(p.get('name'))}</td><td>{esc(p.get('kind'))}</td>"
        f"<td>{esc(pct(p.get('test')))}</td><td>{esc(pct(p.get('shift_mean')))}</td>"
        f"<td>{esc(p.get('n_ingredients') if p.get('n_ingredients') is not None else '–')}</td>"
        f"<td>{esc(p.get('forward_passes') if p.get('forward_passes') is not None else '–')}</td></tr>"
        for i, p in enumerate(rows, 1)
    )
    head = "".join(f"<th>{h}</th>" for h in ("#", "soup", "kind", "test", "shift mean", "models", "passes"))
    return f'<table id="soups" class="compact"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _legend(items: list[tuple[str, str, str]]) -> str:
    out = []
    for shape, colour, label in items:
        mark = f'<span class="swatch {esc(shape)}" style="--c:{esc(colour)}"></span>'
        out.append(f"<span>{mark}{esc(label)}</span>")
    return '<div class="legend">' + "".join(out) + "</div>"


# ---------------------------------------------------------------- the page


def _soup_card(snap: dict[str, Any]) -> str:
    soup = snap.get("soup")
    served = snap.get("served")
    keeper = snap.get("keeper") or {}
    served_line = ""
    if isinstance(served, dict):
        if served.get("ready"):
            served_line = (
                f'<p class="served">serving <b>{esc(served.get("model"))}</b>, soup version '
                f'<b id="served-version">{esc(served.get("soup_version"))}</b></p>'
            )
        else:
            served_line = f'<p class="served warn">model not loaded: {esc(served.get("detail") or "loading")}</p>'
    if not soup:
        seen = keeper.get("candidates_seen")
        return (
            '<section class="card soup"><h2>Soup</h2><p class="big">no soup yet</p>'
            f'<p id="soup-version" data-version="">–</p>'
            f"<p>{esc(seen if seen is not None else 0)} candidate(s) seen by the soup actor.</p>"
            + served_line
            + "</section>"
        )
    ingredients = "".join(
        f'<li><code>{esc(i["trial_id"])}</code> <span class="muted">held-out {esc(pct(i.get("heldout"), 2))}</span></li>'
        for i in soup.get("ingredients", [])
    )
    size = soup.get("heldout_size")
    correct = soup.get("heldout_correct")
    counted = f" ({esc(correct)}/{esc(size)})" if correct is not None and size else ""
    method = f" · {esc(soup['method'])}" if soup.get("method") else ""
    tie = f" · tie {esc(soup['tie'])}" if soup.get("tie") else ""
    rejected = keeper.get("rejected") or {}
    stats = ""
    if keeper:
        stats = (
            f'<p class="muted">{esc(keeper.get("candidates_seen"))} candidate(s) seen, {esc(len(rejected))} '
            f"rejected; {esc(keeper.get('evaluations'))} soup evaluations, "
            f"{esc(keeper.get('heldout_images_evaluated'))} held-out images scored</p>"
        )
    return (
        '<section class="card soup"><h2>Soup</h2>'
        f'<p class="big">version <span id="soup-version" data-version="{esc(soup.get("version"))}">'
        f"{esc(soup.get('version'))}</span></p>"
        f'<p>held-out accuracy <b id="soup-heldout">{esc(pct(soup.get("heldout_accuracy"), 2))}</b>{counted}'
        f"{method}{tie}</p>"
        f'<p class="muted">published {esc(_when(soup.get("published_at")))}</p>'
        + served_line
        + stats
        + f"<h3>{esc(len(soup.get('ingredients', [])))} ingredient(s)</h3>"
        f'<ol id="ingredients">{ingredients}</ol></section>'
    )


def _trial_table(snap: dict[str, Any]) -> str:
    trials = snap.get("trials") or []
    if not trials:
        return '<p class="empty">No trial has reported yet.</p>'
    head = ["trial", "status", "lr", "wd", "epochs", "held-out", "test", "shift mean", "soup"]
    rows = []
    for t in trials:
        hp = t.get("hyperparameters") or {}
        role = str(t.get("soup") or "")
        cls = "in" if role == "in soup" else ("rej" if role.startswith("rejected") else "")
        epochs = t.get("epoch") if t.get("status") == "running" else hp.get("epochs", t.get("epoch"))
        cells = [
            f"<code>{esc(t.get('trial_id'))}</code>",
            esc(t.get("status")),
            esc(_sci(hp.get("lr"))),
            esc(_sci(hp.get("weight_decay"))),
            esc(epochs if epochs is not None else "–"),
            esc(pct(t.get("heldout"))),
            esc(pct(t.get("test"))),
            esc(pct(t.get("shift_mean"))),
            esc(role),
        ]
        rows.append(
            f'<tr class="{cls}" data-trial="{esc(t.get("trial_id"))}">'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    return (
        '<table id="trials"><thead><tr>'
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def render_live(snap: dict[str, Any]) -> str:
    """The part of the page that changes: soup card, both charts, the trial table."""
    curve = snap.get("curve") or []
    kept = sum(1 for c in curve if c.get("accepted"))
    shifts = snap.get("shifts") or []
    greedy_legend = _legend(
        [("circle", "#1e8e3e", "kept"), ("ring", "#d93025", "not kept"), ("line", "#1a73e8", "soup after the step")]
    )
    kinds = {p.get("kind") for p in snap.get("points") or []}
    items = [KIND_STYLE[k] for k in ("individual", "soup", "ensemble", "recipe") if k in kinds]
    if any(p.get("name") == "greedy_soup" for p in snap.get("points") or []):
        items.insert(1, ("square", HIGHLIGHT["greedy_soup"], "greedy soup"))
    scatter_legend = _legend(items)
    shift_note = f" over {len(shifts)} shifts ({', '.join(shifts)})" if shifts else ""
    return (
        '<div class="grid">' + _soup_card(snap) + '<section class="card"><h2>Greedy curve</h2>'
        f'<p class="muted">{esc(len(curve))} candidate(s) in held-out order, {esc(kept)} kept</p>'
        + greedy_svg(curve)
        + greedy_legend
        + "</section>"
        + "</div>"
        + '<section class="card wide"><h2>Test vs distribution shift</h2>'
        f'<p class="muted">mean accuracy{esc(shift_note)}; soups, ensembles and recipes as scored so far</p>'
        '<div class="side"><div>'
        + scatter_svg(snap.get("points") or [])
        + scatter_legend
        + "</div>"
        + soups_table(snap.get("points") or [])
        + "</div></section>"
        + f'<section class="card wide"><h2>Trials ({esc(len(snap.get("trials") or []))})</h2>'
        + _trial_table(snap)
        + "</section>"
        + f'<p class="muted foot">snapshot {esc(_when(snap.get("generated_at")))} · digest '
        f'<code id="digest">{esc(snap.get("digest"))}</code></p>'
    )


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#202124}
header{background:#202124;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}header .muted{color:#bdc1c6}
main{padding:14px 20px}.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dadce0;border-radius:8px;padding:12px 16px;margin-bottom:14px}
.card h2{font-size:15px;margin:0 0 6px}.card h3{font-size:13px;margin:10px 0 4px}
.big{font-size:26px;margin:4px 0}.muted{color:#5f6368}.warn{color:#b3261e}.empty{color:#5f6368;font-style:italic}
ol{margin:0;padding-left:22px}code{font:12px ui-monospace,Menlo,Consolas,monospace}
svg.chart{max-width:100%;height:auto}.grid line.grid,svg line.grid{stroke:#eceff1}
svg .frame{fill:none;stroke:#9aa0a6}svg .tick{font-size:10px;fill:#5f6368}svg .label{font-size:11px;fill:#3c4043}
svg .soup-line{fill:none;stroke:#1a73e8;stroke-width:2}svg .pt-label{font-size:10px;fill:#3c4043}
.legend{display:flex;gap:14px;flex-wrap:wrap;font-size:12px;color:#3c4043;margin-top:4px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:5px;vertical-align:-1px;background:var(--c)}
.swatch.circle{border-radius:50%}.swatch.ring{border-radius:50%;background:none;border:2px solid var(--c);width:7px;height:7px}
.swatch.line{height:3px;vertical-align:3px}.swatch.triangle{clip-path:polygon(50% 0,100% 100%,0 100%)}
.swatch.diamond{clip-path:polygon(50% 0,100% 50%,50% 100%,0 50%)}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #eceff1;text-align:right}
th{background:#f1f3f4;position:sticky;top:0}td:first-child,th:first-child,td:last-child,th:last-child{text-align:left}
tr.in td{background:#e6f4ea}.small{font-size:12px;margin:2px 0}table.compact{font-size:12px;width:auto}table.compact td:nth-child(2){text-align:left}.side{display:flex;gap:22px;flex-wrap:wrap;align-items:flex-start}tr.rej td{color:#b3261e}.wide{overflow-x:auto}.foot{font-size:12px}
"""

SCRIPT = """
(function(){
  var live=document.getElementById('live'), state=document.getElementById('poll-state');
  var every=Math.max(500, 1000*parseFloat(live.getAttribute('data-poll')||'2'));
  var url=live.getAttribute('data-json');
  function show(t){ if(state){ state.textContent=t; } }
  function tick(){
    fetch(url,{cache:'no-store'}).then(function(r){
      if(!r.ok){ throw new Error('HTTP '+r.status); }
      return r.json();
    }).then(function(s){
      if(s.digest===live.getAttribute('data-digest')){ return null; }
      return fetch(location.pathname+location.search,{cache:'no-store'}).then(function(r){ return r.text(); })
        .then(function(text){
          var fresh=new DOMParser().parseFromString(text,'text/html').getElementById('live');
          if(fresh){ live.innerHTML=fresh.innerHTML; live.setAttribute('data-digest',fresh.getAttribute('data-digest')); }
        });
    }).then(function(){ show('live \\u00b7 checked '+new Date().toLocaleTimeString()); },
            function(e){ show('not reachable ('+e.message+'); retrying'); })
      .then(function(){ setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
"""


def render_page(snap: dict[str, Any], json_url: str = JSON_PATH, poll_s: float = DEFAULT_POLL_S) -> str:
    """The whole page for a snapshot; it polls ``json_url`` every ``poll_s`` seconds."""
    title = f"soup-ray · {snap.get('run') or 'run'}"
    name = f" ({snap['name']})" if snap.get("name") and snap.get("name") != snap.get("run") else ""
    refresh = max(2, int(round(poll_s * 3)))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title>"
        f'<noscript><meta http-equiv="refresh" content="{refresh}"></noscript>'
        f"<style>{STYLE}</style></head><body>"
        f'<header><h1>soup-ray · live soup</h1><span id="run-name">{esc(snap.get("run"))}{esc(name)}</span>'
        '<span class="muted" id="poll-state">live</span></header>'
        f'<main id="live" data-digest="{esc(snap.get("digest"))}" data-json="{esc(json_url)}" '
        f'data-poll="{esc(poll_s)}">' + render_live(snap) + "</main>"
        f"<script>{SCRIPT}</script></body></html>"
    )


# ---------------------------------------------------------------- a page server without Ray


def _handler(run_dir: Path, poll_s: float) -> type[BaseHTTPRequestHandler]:
    class LivePageHandler(BaseHTTPRequestHandler):
        server_version = "soup-ray-live"

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = urlsplit(self.path).path
            try:
                if path in ("/", "/index.html"):
                    body = render_page(snapshot(run_dir), JSON_PATH, poll_s).encode()
                    kind = "text/html; charset=utf-8"
                elif path == "/" + JSON_PATH:
                    body = json.dumps(snapshot(run_dir)).encode()
                    kind = "application/json"
                else:
                    self._send(404, b'{"error": "not_found"}', "application/json")
                    return
            except Exception as err:  # noqa: BLE001 - a broken read is answered, never kills the thread
                self._send(
                    500, json.dumps({"error": "snapshot_failed", "detail": str(err)}).encode(), "application/json"
                )
                return
            self._send(200, body, kind)

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the sweep owns the console
            pass

    return LivePageHandler


def start_live_page(
    run_dir: Path | str, host: str = "127.0.0.1", port: int = 0, poll_s: float = DEFAULT_POLL_S
) -> tuple[str, Callable[[], None]]:
    """Serve the live soup page of ``run_dir`` from a daemon thread; returns its URL and a ``stop()``.

    ``port=0`` takes a free port. The page and ``/soup.json`` are read from the
    run folder on each request, so they follow a sweep that is running.
    """
    server = ThreadingHTTPServer((host, int(port)), _handler(Path(run_dir), poll_s))
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="soup-ray-live-page", daemon=True
    )
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    url = f"http://{shown}:{bound_port}/"

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return url, stop
