"""The pipelines the commands run: the main job, the sweep with its report, recomputing a soup, a held-out split.

``cli`` only parses arguments and calls these; they take plain values (a
config, paths, options) so notebooks and tests can call them too.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_json
from .config import SweepConfig, is_uri
from .run_dir import RunDir
from .stages import INTERRUPTED, REPORT, SERVING, SERVING_START, Stages, interrupted, next_step, stopping

Log = Callable[[str], None]


def log_line(msg: str) -> None:
    """The console's progress line."""
    print(f"[soup-ray] {msg}", flush=True)


def run_dir_for(cfg: SweepConfig, out: str | None) -> Path:
    """The run folder: ``out``, or ``<storage>/<name>-<timestamp>``; a URI is refused with the fix."""
    from .prepare import default_run_dir

    if out and is_uri(out):
        raise ValueError(
            f"--out {out!r} is a URI: a run folder is a folder that every node sees at the same path "
            "(mount the bucket, e.g. at /mnt/soup-ray-runs, and give a path under it)"
        )
    return Path(out) if out else default_run_dir(cfg)


@dataclass
class SweepJob:
    """What ``sweep_job`` produced: the run folder, whether a soup was published, whether it was stopped."""

    run_dir: Path
    has_soup: bool
    interrupted: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, in order


def resume_config(run_dir: Path, cfg: SweepConfig | None) -> SweepConfig:
    """The config a resumed sweep runs with: the run folder's own; a given one must not change what was swept."""
    paths = RunDir(run_dir)
    if not paths.config.is_file():
        raise ValueError(
            f"--resume {run_dir}: no {paths.config.name} there, so it is not a soup-ray run folder "
            "(give the folder that `soup-ray sweep` or `soup-ray run` printed)"
        )
    saved = SweepConfig.model_validate_json(paths.config.read_text())
    if cfg is None:
        return saved
    fixed = ("model", "data", "search_space", "tune", "soup")
    changed = [k for k in fixed if getattr(cfg, k).model_dump() != getattr(saved, k).model_dump()]
    if changed:
        raise ValueError(
            f"--resume {run_dir}: the config differs from the run's own in {', '.join(changed)}; a "
            "resumed sweep keeps what it was started with (omit CONFIG to use the run's own)"
        )
    return cfg


def stopped(stages: Stages, command: str, run_dir: Path | None, log: Log) -> None:
    """After a Ctrl-C: the one line saying what was finished and which command carries on."""
    from .stages import RAY_START, TRIALS

    stopping()
    resumable = False
    if run_dir is not None and stages.current in (RAY_START, TRIALS):
        from .cluster.sweep import can_resume

        resumable = can_resume(run_dir)
    log(next_step(stages.current, command, run_dir, resumable))


def sweep_job(
    cfg: SweepConfig | None,
    out: str | None = None,
    log: Log = log_line,
    resume: str | Path | None = None,
    verbose: bool = False,
    command: str = "sweep",
    stages: Stages | None = None,
) -> SweepJob:
    """Prepare the base, run the sweep with the live soup actor, print the tables and write the report.

    ``resume`` (a run folder) continues the sweep there instead of starting a new one. Ctrl-C in any stage
    stops it (Ray shut down, no half-written file) with one line naming what was finished and what to run
    next (``command`` is the CLI command that line names); the job then says ``interrupted``.
    """
    from .cluster.sweep import run_sweep
    from .live_page import start_live_page
    from .prepare import prepare_run

    stages = stages if stages is not None else Stages(log)
    if resume is not None:
        run_dir = Path(resume).resolve()
        cfg = resume_config(run_dir, cfg)
    else:
        assert cfg is not None, "a config is needed to start a sweep"
        run_dir = run_dir_for(cfg, out).resolve()
    try:
        prep = prepare_run(cfg, run_dir, log, stages=stages)
        page_url, stop_page = start_live_page(prep.run_dir)  # 127.0.0.1, a free port; read-only views of the folder
        log(f"live soup page (updates while the sweep runs): {page_url}")
        try:
            outcome = run_sweep(
                cfg, prep.run_dir, log, prepared=prep, resume=resume is not None, verbose=verbose, stages=stages
            )
        finally:
            stop_page()
        if outcome.interrupted:
            stopped(stages, command, prep.run_dir, log)
            return SweepJob(prep.run_dir, False, interrupted=True, seconds=stages.seconds)
        with stages.stage(REPORT):
            ingredients = list((outcome.soup or {}).get("ingredients") or [])
            has_soup = report_stage(
                prep.run_dir, cfg, outcome.rows, ingredients, prep.zero_shot, list(prep.bundle.shifts), log
            )
    except BaseException as err:
        if not interrupted(err):
            raise
        stopped(stages, command, run_dir, log)
        return SweepJob(run_dir, False, interrupted=True, seconds=stages.seconds)
    return SweepJob(prep.run_dir, has_soup, seconds=stages.seconds)


def report_stage(
    run_dir: Path,
    cfg: SweepConfig,
    rows: list[dict],
    ingredients: list[str],
    zero_shot: dict | None,
    shifts: list[str],
    log: Log,
    admitted: object | None = None,
) -> bool:
    """The trial table, then (with a soup) the report: soups, ensembles, diagnostics, recipes, figures.

    Returns whether there was a soup to report on.
    """
    from .report import compute_report, soup_table, write_report
    from .results import print_table

    paths = RunDir(run_dir)
    print_table(rows, shifts, zero_shot, log=print)
    if ingredients:
        log("scoring the soups and ensembles on held-out, test and shifts")
        report = compute_report(
            run_dir,
            greedy_ingredients=ingredients,
            tie=cfg.soup.tie,
            early_rejection=cfg.soup.early_rejection,
            log=log,
            recipes=cfg.soup.methods,
            admitted=admitted,
        )
        written = write_report(run_dir, report)
        print()
        print(soup_table(report))
        log("why: " + report["diagnostics"]["verdict"])
        if report.get("recipes"):
            log(f"best recipe on held-out: {report['winner']} (all recipes under {paths.soups})")
        log("report: " + ", ".join(str(p) for p in written.values()))
        log(f"final soup (open_clip local-dir): {paths.soup}")
    log(f"results: {paths.results}")
    return bool(ingredients)


class SoupNotFinal(ValueError):
    """``soup-ray report`` on a run whose soup has not seen every finished trial."""


def report_job(run_dir: str | Path, log: Log = log_line) -> int:
    """``soup-ray report RUN_DIR``: write the report and recipes of a run whose sweep and soup are finished.

    What ``soup-ray run`` does after the soup, from the run folder alone: the trial table, the soups and
    ensembles scored on held-out, test and shifts, the diagnostics, the config's recipes and the figures.
    The soup is the published one (``soup/``); a soup that has not seen every finished trial is refused
    with the command that finishes it. Ctrl-C stops it with nothing half-written (exit 130).
    """
    from .cluster.keeper import read_state
    from .report import admit_run
    from .results import read_jsonl

    stages = Stages(log)
    run_dir = Path(run_dir).resolve()
    paths = RunDir(run_dir)
    for need in (paths.config, paths.results, paths.soup_info):
        if not need.is_file():
            raise FileNotFoundError(
                f"{run_dir}: no {need.relative_to(run_dir)}, so there is no finished soup to "
                "report on (a soup-ray run folder whose sweep finished, or resume it with: "
                f"soup-ray run --resume {run_dir})"
            )
    cfg = SweepConfig.model_validate_json(paths.config.read_text())
    rows = [r for r in read_jsonl(paths.results) if str(r.get("model_name", "")).startswith("trial_")]
    state = read_state(run_dir) or {}
    seen = set(state.get("records", {})) | set(state.get("rejected", {}))
    missing = sorted(r["trial_id"] for r in rows if r.get("status") == "completed" and r["trial_id"] not in seen)
    if missing:
        raise SoupNotFinal(
            f"{run_dir}: the soup has not seen {len(missing)} finished trial(s) ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); finish it first with: soup-ray run --resume "
            f"{run_dir} --no-serve"
        )
    ingredients = json.loads(paths.soup_info.read_text())["ingredients"]
    zero_shot = json.loads(paths.zero_shot.read_text()) if paths.zero_shot.is_file() else None
    try:
        with stages.stage(REPORT):
            run = admit_run(run_dir, log)
            report_stage(run_dir, cfg, rows, ingredients, zero_shot, list(run.kitchen.bundle.shifts), log, admitted=run)
    except BaseException as err:
        if not interrupted(err):
            raise
        stopped(stages, "report", run_dir, log)
        return INTERRUPTED
    return 0


def run_job(
    cfg: SweepConfig | None,
    out: str | None = None,
    *,
    serve: bool = True,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Log = log_line,
    resume: str | Path | None = None,
    verbose: bool = False,
) -> int:
    """The main job: sweep with the live soup, report, then serve the soup and query it over HTTP until Ctrl-C.

    Ctrl-C in any stage stops it cleanly (exit 130) with one line naming what to run next.
    """
    t0 = time.time()
    stages = Stages(log)
    job = sweep_job(cfg, out, log, resume=resume, verbose=verbose, command="run", stages=stages)
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
    stages.start(SERVING_START)

    def ready(url: str) -> None:
        stages.start(SERVING, timed=False)
        print_wall_times(job.seconds, RunDir(job.run_dir).timings, log)
        show_queries(url, job.run_dir, log=log, token_file=token_file)
        log(f"serving the soup at {url}  (POST {url}/predict, GET {url}/info, docs {url}/docs); Ctrl-C stops")

    try:
        serve_run(
            job.run_dir,
            host,
            port,
            blocking=True,
            log=log,
            on_ready=ready,
            auth_token_file=token_file,
            ensemble=serve_cfg.ensemble,
            verbose=verbose,
            throughput_mode=serve_cfg.throughput_mode,
            num_cpus=serve_cfg.num_cpus,
            num_gpus=serve_cfg.num_gpus,
            model_replicas=serve_cfg.model_replicas,
            ingress_replicas=serve_cfg.ingress_replicas,
            max_batch_size=serve_cfg.max_batch_size,
            topology=serve_cfg.topology,
        )
    except BaseException as err:  # a Ctrl-C while Ray Serve is imported can arrive as pydantic-core's error
        if not interrupted(err):
            raise
        stopped(stages, "run", job.run_dir, log)
        return INTERRUPTED
    return 0


def print_wall_times(seconds: dict[str, float], path: Path, log: Log = log_line) -> None:
    """The run's wall time per stage as one table (and ``timings.json`` in the run folder)."""
    total = sum(seconds.values())
    write_json(path, {"seconds": seconds, "total": total})
    width = max(len(k) for k in seconds) if seconds else 5
    log("wall time of this run:")
    for k, v in seconds.items():
        log(f"  {k.ljust(width)}  {v:7.1f} s  {100 * v / total if total else 0:5.1f}%")
    log(f"  {'total'.ljust(width)}  {total:7.1f} s")


def show_queries(url: str, run_dir: Path, n: int = 5, log: Log = log_line, token_file: str | None = None) -> None:
    """Post a few real test digits as PNG to the served soup, one of each of ``n`` classes, and print what
    comes back (with the bearer token of ``token_file`` when the server wants one)."""
    import httpx
    from PIL import Image

    from .data import build_dataset, labels_of, one_per_class
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
        log(
            f"GET /info -> soup version {info.get('soup_version')}, {len(info.get('ingredients') or [])} "
            f"ingredient(s), held-out {info.get('heldout_accuracy')}"
        )
        for i in one_per_class(labels_of(test), n):
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


def recompute_soup(
    run_dir: Path,
    method: str = "greedy",
    tie: str | None = None,
    early_rejection: bool = True,
    report: bool = False,
    log: Log = log_line,
    options: dict | None = None,
) -> dict:
    """Compute a soup recipe offline from the run's checkpoints.

    Writes ``soups/<method>/`` (an open_clip local-dir folder, servable with
    ``--method``), its summary row in ``results.jsonl``, ``soups/<method>.json``
    for the id recipes (greedy, uniform, best: ingredients and search cost),
    and with ``report`` the whole report.
    """
    from .cookbook import RecipeSpec, cook_one
    from .report import (
        admit_run,
        compute_report,
        method_ingredients,
        results_path,
        soup_table,
        write_report,
        write_soup_json,
    )
    from .results import upsert_summary_row
    from .soup import GreedyResult, WeightRecipe, configure_soup_method, greedy_method

    recipe = configure_soup_method(method, options, tie=tie)  # an unknown name or option fails before any work
    run_dir = Path(run_dir)
    results_path(run_dir)
    run = admit_run(run_dir, log)
    spec = RecipeSpec(method, {k: v for k, v in recipe.options.items()}, method)
    shifts = list(run.kitchen.bundle.shifts)
    if isinstance(recipe, WeightRecipe):
        greedy = greedy_method(">=")(
            run.candidates, run.kitchen.evaluate, heldout_size=run.kitchen.heldout_size, early_rejection=early_rejection
        )
        cooked = cook_one(run.kitchen, run.candidates, greedy, spec, run_dir, shifts, log)
        upsert_summary_row(RunDir(run_dir).results, cooked.row)
        r = cooked.row
        print(
            f"method: {method} ({', '.join(f'{k}={v}' for k, v in r['params'].items() if not isinstance(v, (list, tuple, dict)))})"
        )
        print(f"ingredients ({r['n_ingredients']} of {len(run.candidates)}): {', '.join(r['ingredients'])}")
        print(
            f"held-out accuracy: {100 * r['heldout']:.2f}%, test {100 * r['test']:.2f}%"
            + (f", shift mean {100 * r['shift_mean']:.2f}%" if r.get("shift_mean") is not None else "")
        )
        log(f"wrote {RunDir(run_dir).recipe(method)}")
        return {
            "ingredients": r["ingredients"],
            "correct": r["heldout_correct"],
            "heldout_size": run.kitchen.heldout_size,
            "folder": str(RunDir(run_dir).recipe(method)),
        }
    result = method_ingredients(run_dir, recipe, early_rejection=early_rejection, admitted=run, log=log)
    h = run.kitchen.heldout_size
    print(f"method: {method}" + (f" (tie {recipe.tie})" if recipe.tie else ""))
    print(f"ingredients ({len(result.ingredients)} of {len(run.candidates)}): {', '.join(result.ingredients)}")
    print(f"held-out accuracy: {100 * result.correct / h:.2f}% ({result.correct}/{h})")
    print(f"evaluations: {result.evaluations}, held-out images evaluated: {result.images_evaluated}")
    out = write_soup_json(run_dir, method, result, tie=recipe.tie, early_rejection=early_rejection, admitted=run)
    cooked = cook_one(
        run.kitchen, run.candidates, GreedyResult(list(result.ingredients), result.correct), spec, run_dir, shifts, log
    )
    upsert_summary_row(RunDir(run_dir).results, cooked.row)
    log(f"wrote {out} and {RunDir(run_dir).recipe(method)}")
    if report:
        full = compute_report(
            run_dir,
            tie=recipe.tie or ">=",
            early_rejection=early_rejection,
            log=log,
            admitted=run,
            greedy_result=result if recipe.tie is not None else None,
        )
        written = write_report(run_dir, full)
        print(soup_table(full))
        log("report: " + ", ".join(str(p) for p in written.values()))
    return {"ingredients": result.ingredients, "correct": result.correct, "heldout_size": h, "file": str(out)}


def heldout_index_job(
    train_dir: Path,
    out: Path,
    per_class: int | None,
    fraction: float | None,
    seed: int = 0,
    force: bool = False,
    log: Log = log_line,
) -> list[str]:
    """Write the held-out split of an image folder as an index file (never over an existing one without ``force``)."""
    from .data import write_heldout_index

    train, out = Path(train_dir), Path(out)
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no such training folder (expected <class>/<image> folders)")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: give the path of the index file to write, e.g. {out}/heldout.json")
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} exists: it may define the held-out split of earlier runs; pass --force to "
            "replace it or choose another path"
        )
    if per_class is not None and per_class < 1:
        raise ValueError(f"--per-class {per_class}: give at least 1 image per class")
    if fraction is not None and not 0.0 < fraction < 0.5:
        raise ValueError(f"--fraction {fraction}: give a fraction above 0 and below 0.5, e.g. 0.02")
    amount: float | int = per_class if per_class is not None else fraction  # type: ignore[assignment]
    log(f"scanning {train} ...")
    rel = write_heldout_index(out, train, amount, seed=seed)
    classes = len({Path(r).parts[0] for r in rel})
    log(
        f"wrote {out}: {len(rel)} held-out images from {classes} classes (seed {seed}); "
        f"set data.heldout_index: {out} in the sweep config"
    )
    return rel
