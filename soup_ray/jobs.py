"""The pipelines the commands run: the main job, the sweep with its report, recomputing a soup, a held-out split.

``cli`` only parses arguments and calls these; they take plain values (a
config, paths, options) so notebooks and tests can call them too.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import SweepConfig, is_uri
from .run_dir import RunDir

Log = Callable[[str], None]


def log_line(msg: str) -> None:
    """The console's progress line."""
    print(f"[soup-ray] {msg}", flush=True)


def run_dir_for(cfg: SweepConfig, out: str | None) -> Path:
    """The run folder: ``out``, or ``<storage>/<name>-<timestamp>``; a URI is refused with the fix."""
    from .prepare import default_run_dir

    if out and is_uri(out):
        raise ValueError(f"--out {out!r} is a URI: a run folder is a folder that every node sees at the same path "
                         "(mount the bucket, e.g. at /mnt/soup-ray-runs, and give a path under it)")
    return Path(out) if out else default_run_dir(cfg)


@dataclass
class SweepJob:
    """What ``sweep_job`` produced: the run folder, whether a soup was published, whether it was stopped."""

    run_dir: Path
    has_soup: bool
    interrupted: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, in order


INTERRUPTED = 130
"""Exit status of a sweep stopped with Ctrl-C (128 + SIGINT), as shells report it."""


def resume_config(run_dir: Path, cfg: SweepConfig | None) -> SweepConfig:
    """The config a resumed sweep runs with: the run folder's own; a given one must not change what was swept."""
    paths = RunDir(run_dir)
    if not paths.config.is_file():
        raise ValueError(f"--resume {run_dir}: no {paths.config.name} there, so it is not a soup-ray run folder "
                         "(give the folder that `soup-ray sweep` or `soup-ray run` printed)")
    saved = SweepConfig.model_validate_json(paths.config.read_text())
    if cfg is None:
        return saved
    fixed = ("model", "data", "search_space", "tune", "soup")
    changed = [k for k in fixed if getattr(cfg, k).model_dump() != getattr(saved, k).model_dump()]
    if changed:
        raise ValueError(f"--resume {run_dir}: the config differs from the run's own in {', '.join(changed)}; a "
                         "resumed sweep keeps what it was started with (omit CONFIG to use the run's own)")
    return cfg


def sweep_job(cfg: SweepConfig | None, out: str | None = None, log: Log = log_line,
              resume: str | Path | None = None, verbose: bool = False) -> SweepJob:
    """Prepare the base, run the sweep with the live soup actor, print the tables and write the report.

    ``resume`` (a run folder) continues the sweep there instead of starting a new one.
    """
    from .cluster.sweep import resume_hint, run_sweep
    from .prepare import prepare_run
    from .report import compute_report, soup_table, write_report
    from .results import print_table

    if resume is not None:
        run_dir = Path(resume).resolve()
        cfg = resume_config(run_dir, cfg)
    else:
        assert cfg is not None, "a config is needed to start a sweep"
        run_dir = run_dir_for(cfg, out)
    t_prep = time.time()
    prep = prepare_run(cfg, run_dir, log)
    seconds = {"stand-in and base": time.time() - t_prep}
    from .live_page import start_live_page

    page_url, stop_page = start_live_page(prep.run_dir)  # 127.0.0.1, a free port; read-only views of the folder
    log(f"live soup page (updates while the sweep runs): {page_url}")
    try:
        outcome = run_sweep(cfg, prep.run_dir, log, prepared=prep, resume=resume is not None, verbose=verbose)
    except KeyboardInterrupt:
        log(f"stopped; what finished is kept in {prep.run_dir}. Resume with: {resume_hint(prep.run_dir)}")
        return SweepJob(prep.run_dir, False, interrupted=True)
    finally:
        stop_page()
    paths = RunDir(prep.run_dir)
    if outcome.interrupted:
        return SweepJob(prep.run_dir, False, interrupted=True)
    seconds.update(outcome.seconds)
    t_report = time.time()
    print_table(outcome.rows, list(prep.bundle.shifts), prep.zero_shot, log=print)
    has_soup = bool(outcome.soup is not None and outcome.soup.get("ingredients"))
    if has_soup:
        log("scoring the soups and ensembles on held-out, test and shifts")
        report = compute_report(prep.run_dir, greedy_ingredients=outcome.soup["ingredients"], tie=cfg.soup.tie,
                                early_rejection=cfg.soup.early_rejection, log=log, recipes=cfg.soup.methods)
        written = write_report(prep.run_dir, report)
        print()
        print(soup_table(report))
        log("why: " + report["diagnostics"]["verdict"])
        if report.get("recipes"):
            log(f"best recipe on held-out: {report['winner']} (all recipes under {paths.soups})")
        log("report: " + ", ".join(str(p) for p in written.values()))
        log(f"final soup (open_clip local-dir): {paths.soup}")
    log(f"results: {paths.results}")
    seconds["report and recipes"] = time.time() - t_report
    return SweepJob(prep.run_dir, has_soup, seconds=seconds)


def run_job(cfg: SweepConfig | None, out: str | None = None, *, serve: bool = True, host: str = "127.0.0.1",
            port: int = 8000, log: Log = log_line, resume: str | Path | None = None, verbose: bool = False) -> int:
    """The main job: sweep with the live soup, report, then serve the soup and query it over HTTP until Ctrl-C."""
    t0 = time.time()
    job = sweep_job(cfg, out, log, resume=resume, verbose=verbose)
    if job.interrupted:
        return INTERRUPTED
    log(f"sweep, soup and report done in {time.time() - t0:.0f}s")
    if not serve:
        print_wall_times(job.seconds, RunDir(job.run_dir).timings, log)
        return 0
    if not RunDir(job.run_dir).soup_info.is_file():
        log("no soup was published (no trial completed); nothing to serve")
        return 1
    from .serving import serve_run

    serve_cfg = SweepConfig.model_validate_json(RunDir(job.run_dir).config.read_text()).serve
    token_file = serve_cfg.auth_token_file

    t_serve = time.time()

    def ready(url: str) -> None:
        job.seconds["serving start"] = time.time() - t_serve
        print_wall_times(job.seconds, RunDir(job.run_dir).timings, log)
        show_queries(url, job.run_dir, log=log, token_file=token_file)
        log(f"serving the soup at {url}  (POST {url}/predict, GET {url}/info, docs {url}/docs); Ctrl-C stops")

    serve_run(job.run_dir, host, port, blocking=True, log=log, on_ready=ready, auth_token_file=token_file,
              ensemble=serve_cfg.ensemble, verbose=verbose)
    return 0


def print_wall_times(seconds: dict[str, float], path: Path, log: Log = log_line) -> None:
    """The run's wall time per stage as one table (and ``timings.json`` in the run folder)."""
    total = sum(seconds.values())
    path.write_text(json.dumps({"seconds": seconds, "total": total}, indent=2))
    width = max(len(k) for k in seconds) if seconds else 5
    log("wall time of this run:")
    for k, v in seconds.items():
        log(f"  {k.ljust(width)}  {v:7.1f} s  {100 * v / total if total else 0:5.1f}%")
    log(f"  {'total'.ljust(width)}  {total:7.1f} s")


def show_queries(url: str, run_dir: Path, n: int = 5, log: Log = log_line, token_file: str | None = None) -> None:
    """Post a few real test digits as PNG to the served soup and print what comes back (with the bearer
    token of ``token_file`` when the server wants one)."""
    import httpx
    from PIL import Image

    from .data import build_dataset
    from .serving.auth import read_token

    headers = {"Authorization": f"Bearer {read_token(token_file).decode()}"} if token_file else {}

    paths = RunDir(run_dir)
    cfg = SweepConfig.model_validate_json(paths.config.read_text())
    meta = json.loads(paths.base_meta.read_text())
    test = build_dataset(cfg.data, int(meta["image_size"])).test
    deadline = time.time() + 120
    with httpx.Client(timeout=30, headers=headers) as client:
        while time.time() < deadline:
            try:
                if client.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        info = client.get(f"{url}/info").json()
        log(f"GET /info -> soup version {info.get('soup_version')}, {len(info.get('ingredients') or [])} "
             f"ingredient(s), held-out {info.get('heldout_accuracy')}")
        for i in range(min(n, len(test))):
            x, y = test[i]
            buf = io.BytesIO()
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(buf, format="PNG")
            r = client.post(f"{url}/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
            top = r.json()["predictions"][0] if r.status_code == 200 else r.json()
            label = meta["classnames"][int(y)]
            if r.status_code == 200:
                log(f"POST /predict (test image {i}, a {label}) -> {top['label']} ({100 * top['probability']:.1f}%)")
            else:
                log(f"POST /predict (test image {i}) -> HTTP {r.status_code}: {top}")




def recompute_soup(run_dir: Path, method: str = "greedy", tie: str | None = None, early_rejection: bool = True,
                   report: bool = False, log: Log = log_line, options: dict | None = None) -> dict:
    """Compute a soup recipe offline from the run's checkpoints.

    Writes ``soups/<method>/`` (an open_clip local-dir folder, servable with
    ``--method``), its summary row in ``results.jsonl``, ``soups/<method>.json``
    for the id recipes (greedy, uniform, best: ingredients and search cost),
    and with ``report`` the whole report.
    """
    from .cookbook import RecipeSpec, cook_one
    from .report import admit_run, compute_report, method_ingredients, results_path, soup_table, write_report, \
        write_soup_json
    from .results import upsert_summary_row
    from .soup import GreedyResult, WeightRecipe, configure_soup_method, greedy_method

    recipe = configure_soup_method(method, options, tie=tie)  # an unknown name or option fails before any work
    run_dir = Path(run_dir)
    results_path(run_dir)
    run = admit_run(run_dir, log)
    spec = RecipeSpec(method, {k: v for k, v in recipe.options.items()}, method)
    shifts = list(run.kitchen.bundle.shifts)
    if isinstance(recipe, WeightRecipe):
        greedy = greedy_method(">=")(run.candidates, run.kitchen.evaluate, heldout_size=run.kitchen.heldout_size,
                                     early_rejection=early_rejection)
        cooked = cook_one(run.kitchen, run.candidates, greedy, spec, run_dir, shifts, log)
        upsert_summary_row(RunDir(run_dir).results, cooked.row)
        r = cooked.row
        print(f"method: {method} ({', '.join(f'{k}={v}' for k, v in r['params'].items() if not isinstance(v, (list, tuple, dict)))})")
        print(f"ingredients ({r['n_ingredients']} of {len(run.candidates)}): {', '.join(r['ingredients'])}")
        print(f"held-out accuracy: {100 * r['heldout']:.2f}%, test {100 * r['test']:.2f}%"
              + (f", shift mean {100 * r['shift_mean']:.2f}%" if r.get("shift_mean") is not None else ""))
        log(f"wrote {RunDir(run_dir).recipe(method)}")
        return {"ingredients": r["ingredients"], "correct": r["heldout_correct"],
                "heldout_size": run.kitchen.heldout_size, "folder": str(RunDir(run_dir).recipe(method))}
    result = method_ingredients(run_dir, recipe, early_rejection=early_rejection, admitted=run, log=log)
    h = run.kitchen.heldout_size
    print(f"method: {method}" + (f" (tie {recipe.tie})" if recipe.tie else ""))
    print(f"ingredients ({len(result.ingredients)} of {len(run.candidates)}): {', '.join(result.ingredients)}")
    print(f"held-out accuracy: {100 * result.correct / h:.2f}% ({result.correct}/{h})")
    print(f"evaluations: {result.evaluations}, held-out images evaluated: {result.images_evaluated}")
    out = write_soup_json(run_dir, method, result, tie=recipe.tie, early_rejection=early_rejection, admitted=run)
    cooked = cook_one(run.kitchen, run.candidates, GreedyResult(list(result.ingredients), result.correct), spec,
                      run_dir, shifts, log)
    upsert_summary_row(RunDir(run_dir).results, cooked.row)
    log(f"wrote {out} and {RunDir(run_dir).recipe(method)}")
    if report:
        full = compute_report(run_dir, tie=recipe.tie or ">=", early_rejection=early_rejection, log=log, admitted=run,
                              greedy_result=result if recipe.tie is not None else None)
        written = write_report(run_dir, full)
        print(soup_table(full))
        log("report: " + ", ".join(str(p) for p in written.values()))
    return {"ingredients": result.ingredients, "correct": result.correct, "heldout_size": h, "file": str(out)}


def heldout_index_job(train_dir: Path, out: Path, per_class: int | None, fraction: float | None, seed: int = 0,
                      force: bool = False, log: Log = log_line) -> list[str]:
    """Write the held-out split of an image folder as an index file (never over an existing one without ``force``)."""
    from .data import write_heldout_index

    train, out = Path(train_dir), Path(out)
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no such training folder (expected <class>/<image> folders)")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: give the path of the index file to write, e.g. {out}/heldout.json")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: it may define the held-out split of earlier runs; pass --force to "
                              "replace it or choose another path")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class {per_class}: give at least 1 image per class")
    if fraction is not None and not 0.0 < fraction < 0.5:
        raise ValueError(f"--fraction {fraction}: give a fraction above 0 and below 0.5, e.g. 0.02")
    amount: float | int = per_class if per_class is not None else fraction  # type: ignore[assignment]
    log(f"scanning {train} ...")
    rel = write_heldout_index(out, train, amount, seed=seed)
    classes = len({Path(r).parts[0] for r in rel})
    log(f"wrote {out}: {len(rel)} held-out images from {classes} classes (seed {seed}); "
        f"set data.heldout_index: {out} in the sweep config")
    return rel
