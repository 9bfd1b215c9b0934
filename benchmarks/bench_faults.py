"""The fault suite's scenarios (issue 10) as a benchmark: how long the service takes to recover from each fault,
and whether it kept its promises through it.

For each fault (SIGKILL of a worker mid-job, a Redis restart that loses every queued message, a Postgres restart,
SIGKILL and restart of the API, each with and without PRUNERY_BROKER_KEYPREFIX; a 12 s Redis outage with it): a
stack of its own (`prunery serve`, two `celery worker` processes, a Postgres cluster made with initdb and a
`redis-server` on random ports, a folder store; fast leases and reaper), a batch of 10 jobs created and waited
for by 10 caller threads through `prunery.client.Client` with its default settings, and the fault in the middle of
the batch. The harness is the test suite's (`tests/e2e/test_faults.py: run_scenario`), so this measures exactly what
the tests check.

Printed per scenario: the time to recover, counted from the moment the dependency is back (the process restarted
and accepting) to the first successful client call, the first job event and the first claim of a job, and until
the batch is done (for a killed worker: also from the kill to its job's next claim); then one line per promise,
MET or MISSED:

- every job SUCCEEDED exactly once (one SUCCEEDED event, one MODEL and one REPORT artifact and exactly those
  objects in the store, no PENDING artifact, no job created twice);
- no client error (no caller saw any exception or a job ending otherwise);
- at most one message per job outstanding at any time (sampled every 100 ms from the queue list and the unacked
  hash).

Everything started is stopped and removed on the way out, on failure and on SIGTERM too.

    python benchmarks/bench_faults.py [--fault worker_sigkill|redis_restart|postgres_restart|api_sigkill|
                                               redis_long_outage ...] [--keyprefix both|on|off]

Without --fault and --keyprefix: the test suite's cases (`CASES`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `tests` is importable

from tests.e2e.test_faults import CASES, FAULTS, ScenarioResult, export_model, run_scenario  # noqa: E402


@dataclass
class Outcome:
    line: str
    ok: bool


RESULTS: list[Outcome] = []


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def report(line: str, ok: bool) -> None:
    line = f"{line}: {verdict(ok)}"
    RESULTS.append(Outcome(line, ok))
    print(line, flush=True)


def seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def show(result: ScenarioResult) -> None:
    name = result.name()
    print(f"{name}: time to recover after the dependency was back: first client call {seconds(result.recover_call_s)}, "
          f"first job event {seconds(result.recover_event_s)}, first claim {seconds(result.recover_claim_s)}; "
          f"batch done {seconds(result.drain_s)} after", flush=True)
    if result.victim is not None:
        print(f"{name}: the killed worker's job claimed again {seconds(result.victim_rerun_s)} after the kill",
              flush=True)
    print(f"{name}: {result.requeued} expired lease(s) requeued, {result.resent} lost message(s) resent; "
          f"wall {result.wall_s:.1f} s", flush=True)
    for note in result.notes:
        print(f"  note: {note}", flush=True)
    for problem in result.problems:
        print(f"  problem: {problem}", flush=True)
    for error in result.client_errors:
        print(f"  client error: {error.splitlines()[0]}", flush=True)
    for v in result.violations[:5]:
        print(f"  more than one message: {v}", flush=True)
    if len(result.violations) > 5:
        print(f"  ... {len(result.violations) - 5} more samples with more than one message", flush=True)
    report(f"{name}: every job SUCCEEDED exactly once ({len(result.jobs)} jobs)", result.succeeded_once)
    report(f"{name}: no client error ({len(result.client_errors)} errors)", result.no_client_error)
    report(f"{name}: at most one message per job outstanding (max {result.max_outstanding} over "
           f"{result.outstanding_samples} samples)", result.one_message)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fault", action="append", choices=FAULTS,
                   help="run this fault (repeatable; default: the test suite's cases)")
    p.add_argument("--keyprefix", choices=("both", "on", "off"),
                   help="with PRUNERY_BROKER_KEYPREFIX set, without, or both (default: as the test suite)")
    p.add_argument("--logs", action="store_true", help="print the processes' logs of a scenario that missed")
    args = p.parse_args(argv)
    if shutil.which("redis-server") is None:
        p.error("needs redis-server on PATH")

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    if args.fault or args.keyprefix:
        prefixes = {"both": (False, True), "on": (True,), "off": (False,)}[args.keyprefix or "both"]
        cases = [(f, kp) for f in args.fault or FAULTS for kp in prefixes]
    else:
        cases = list(CASES)
    t_start = time.monotonic()
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="prunery-bench-faults-") as tmp:
        model = export_model(Path(tmp) / "conv1d.pt2")
        for fault, keyprefix in cases:
            name = f"{fault}{' with PRUNERY_BROKER_KEYPREFIX' if keyprefix else ''}"
            print(f"\n== {name} (load average {os.getloadavg()[0]:.2f}) ==", flush=True)
            root = Path(tempfile.mkdtemp(prefix=f"{fault}-", dir=tmp))
            try:
                result = run_scenario(fault, keyprefix=keyprefix, root=root, model_path=model,
                                      say=lambda line: print(line, flush=True))
            except Exception as e:
                failed.append(name)
                print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                shutil.rmtree(root, ignore_errors=True)
            show(result)
            if args.logs and not result.ok:
                print(result.logs, flush=True)
    print(f"\n== summary (wall {time.monotonic() - t_start:.0f} s, load average {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} cores) ==")
    for r in RESULTS:
        print(r.line)
    for name in failed:
        print(f"{name}: ERROR (see above)")
    met = sum(r.ok for r in RESULTS)
    print(f"targets met: {met}/{len(RESULTS)}" + (f"; scenarios failed to run: {failed}" if failed else ""))
    return 1 if failed or met < len(RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
