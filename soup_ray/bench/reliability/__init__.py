"""Reliability under faults: five bounded fault scenarios on the embedded local Ray with the tiny offline stand-in.

``bench/reliability.py`` runs them and writes ``bench/results/reliability-<date>.json``:

1. **soup actor killed during a sweep**: a real ``run_sweep`` whose soup actor is
   killed (``ray.kill(..., no_restart=False)``, Ray restarts it) after some trial
   completions and, from a thread polling ``status()``, while it is evaluating
   (``busy``). Afterwards the published soup must be bit-identical to the batch
   greedy soup over the same trials (``Kitchen`` + ``greedy_soup``, ``torch.equal``
   on the head and on every open_clip tensor) and every offer accounted for
   (records + rejected), none lost, none counted twice.
2. **a trial killed mid-way and resumed**: a sweep with ``tune.max_failures: 1``
   and a resumable state after every epoch; the trial's worker process is
   SIGKILLed once, right after Tune registered its epoch-1 checkpoint. Tune
   restarts it from that checkpoint; its final weights must equal an
   uninterrupted in-process ``fine_tune`` of the same hyperparameters.
3. **the driver killed mid-sweep**: ``soup-ray sweep`` in a subprocess is
   SIGKILLed once a trial finished, then ``soup-ray sweep --resume``; counts the
   finished trials trained again, checks ``results.jsonl`` (every trial once) and
   the soup against the offline greedy soup, and that no process of the killed
   driver's Ray outlived it (any that did are killed by PID and reported).
4. **a Serve model replica killed under load**: the run of scenario 1 served
   (``serve_run``), load from ``loadgen.run_level`` at concurrency 8, the Model
   replica killed at t≈5 s; requests sent and failed, the recovery time and
   whether Serve brought a new replica back.
5. **soak**: concurrency 32 on loopback for 60 s (10 s with ``--quick``) against
   the same server: failed requests, p99 latency and the replica's RSS at the
   start and the end.

Every scenario is bounded in time (sweeps by a watchdog that stops Tune the way
Ctrl-C does, subprocesses by timeouts, load by ``run_level``'s own bounds) and
records what was injected and what survived. This is a benchmark, not a test:
a failed check is written into the JSON and the summary, never raised.

One module per scenario (``soup_actor``, ``trial_kill``, ``driver_kill``, and
``serve_faults`` for 4 and 5), what they share in ``common``, and ``runner``:
the registry ``SCENARIOS`` (number -> name and function), the arguments, the
summary table and ``main``. A new scenario is a module and a line there.
"""

from .runner import SCENARIOS, main

__all__ = ["SCENARIOS", "main"]
