"""`prunery` command line: the engine on local files (analyze, prune, demo), the service's processes
(up, serve, worker) and its client (submit, jobs, download, tokens)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path


def _save_program(ep, out: Path) -> None:
    """Write atomically: a failed save leaves no partial file behind."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    # torch wants the .pt2 suffix; the dot prefix keeps the partial file out of sight until the rename
    fd, tmp = tempfile.mkstemp(prefix="." + out.stem + ".", suffix=".partial.pt2", dir=out.parent)
    os.close(fd)
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, out)


def _spec_from(args: argparse.Namespace, model: str, dataset: str = ""):
    """The job spec of the command's options (`prunery.core.spec`), checked: ValueError with its first
    problem."""
    from prunery.core.spec import JobSpec, fields_of, first_problem

    values = {f.name: getattr(args, f.name) for f in fields_of() if f.metadata["cli"] and hasattr(args, f.name)}
    values.update(ignore=tuple(values.get("ignore") or ()), dataset=dataset)
    spec = JobSpec(model=model, **values)
    problems = spec.problems()
    if problems:
        raise ValueError(first_problem(problems))
    return spec


def cmd_analyze(args: argparse.Namespace) -> int:
    from prunery.core import DependencyGraph, load_program

    ep = load_program(args.model)
    graph = DependencyGraph(ep, ignore=tuple(args.ignore or ()))
    groups = graph.summary()
    if args.json:
        print(json.dumps({"num_groups": len(groups), "frozen_ops": sorted(graph.frozen_ops), "groups": groups},
                         indent=2))
        return 0
    print(f"{len(groups)} groups")
    for g in groups:
        members = ", ".join(f"{m['name']}[{m['dim']}]" for m in g["members"])
        print(f"group {g['id']}: size {g['size']}: {members}")
    if graph.frozen_ops:
        print("frozen ops (no rule, dims kept): " + ", ".join(sorted(graph.frozen_ops)))
    return 0


def _print_summary(report: dict, out: Path) -> None:
    pb, pa, mb, ma = (report[k] for k in ("params_before", "params_after", "macs_before", "macs_after"))
    print(f"wrote {out}")
    print(f"params {pb:,} -> {pa:,} ({pa / max(pb, 1):.1%}), MACs {mb:,} -> {ma:,} ({ma / max(mb, 1):.1%}), "
          f"{report['pruned_groups']}/{report['num_groups']} groups pruned in {report['duration_s']:.2f}s")
    if report["frozen_ops"]:
        print("frozen ops (no rule, dims kept): " + ", ".join(report["frozen_ops"]))
    target = report.get("target")
    if target:
        print(f"target {target['metric']} {target['goal']:.6g}: reached {target['reached']:.6g} "
              f"({target['within']:.1%} off{'' if target['met'] else ', NOT within the 2% asked'}) "
              f"in {len(target['rounds'])} rounds")
    shown: tuple[str, ...] = ("accuracy", "agreement", "cosine", "loss")
    if (report.get("dataset") or {}).get("metric") == "cosine":  # embeddings: a top-1 over their dims means nothing
        shown = ("cosine", "loss")
    for name, metrics in (report.get("evaluation") or {}).items():
        print(f"held-out {name.replace('_', ' ')}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k in shown))
    latency = report.get("latency_ms")
    if latency and "before" in latency:
        print(f"latency ms, median of {latency.get('rounds', '?')} interleaved rounds on {latency.get('threads', '?')} "
              "threads (batch: before -> after, speedup): " + ", ".join(
                  f"{b}: {latency['before'][b]['median_ms']:.3f} -> {latency['after'][b]['median_ms']:.3f} "
                  f"({latency['speedup'][b]:.2f}x)" for b in latency["before"]))
    for warning in report.get("warnings") or ():
        print(f"warning: {warning}")


def _print_progress(stage: str, fraction: float, message: str) -> None:
    print(f"[{stage}] {message}", flush=True)


def cmd_prune(args: argparse.Namespace) -> int:
    from prunery.core import PruneConfig, load_program, prune
    from prunery.core.data import load_dataset
    from prunery.core.recipe import Recipe, run_recipe

    spec = _spec_from(args, args.model, args.dataset or "")
    config = PruneConfig.from_spec(spec)
    recipe = Recipe.from_spec(spec, load_dataset(args.dataset) if args.dataset else None, args.device)
    if recipe is not None:
        recipe.validate(config)
    ep = load_program(args.model)
    result = prune(ep, config) if recipe is None else run_recipe(ep, config, recipe, _print_progress)
    out = Path(args.output)
    _save_program(result.program, out)
    if args.report:
        _write_json(result.report, Path(args.report))
    _print_summary(result.report, out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Export the package's demo model (`prunery/demo_model.py`), then prune it through the embedded service
    (`prunery up`) — or, with `--local`, with the engine in this process — and reload the result through the safe
    intake."""
    import torch

    from prunery import demo_model
    from prunery.core import PruneConfig, load_program, prune

    if args.model != demo_model.NAME:
        raise ValueError(f"unknown demo model {args.model!r}; choices: {demo_model.NAME}")
    out = Path(args.out)
    model_path = out / f"{args.model}.pt2"
    _save_program(demo_model.export(), model_path)
    print(f"exported the demo model {args.model!r} to {model_path}")
    pruned_path, report_path = out / f"{args.model}-pruned.pt2", out / "report.json"
    if args.local:
        ep = load_program(model_path)  # through the safe intake, as an upload would be
        result = prune(ep, PruneConfig(ratio=args.ratio))
        _save_program(result.program, pruned_path)
        _write_json(result.report, report_path)
        report = result.report
    else:
        report = _demo_through_service(model_path, pruned_path, report_path, args.ratio, out / "service")
    _print_summary(report, pruned_path)
    x = demo_model.example_inputs(4)
    with torch.no_grad():
        y = load_program(pruned_path).module()(*x)
    print(f"reloaded pruned model runs at batch 4: output shape {tuple(y.shape)}; report: {report_path}")
    return 0


def _demo_through_service(model: Path, pruned: Path, report: Path, ratio: float, data_dir: Path) -> dict:
    import subprocess

    from prunery.client import Client, spec_from_options
    from prunery.v1 import prunery_pb2 as pb

    up = subprocess.Popen([sys.executable, "-m", "prunery.cli", "up", "--data-dir", str(data_dir), "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        found: dict[str, str] = {}
        assert up.stdout is not None  # stdout=PIPE
        while len(found) < 2:
            line = up.stdout.readline()
            if not line:
                raise RuntimeError("`prunery up` stopped before printing its address and token")
            key, _, value = line.strip().partition(": ")
            found[key] = value
        print(f"started the embedded stack (prunery up) at {found['address']}, data in {data_dir}")
        with Client(found["address"], found["token"]) as client:
            artifact = client.upload(model)
            job = client.create_job(spec_from_options(artifact.name, ratio))
            print(f"submitted {job.name}")
            progress = _Progress()
            job = client.wait(job.name, on_event=progress)
            progress.close()
            if job.state != pb.SUCCEEDED:
                raise RuntimeError(f"{job.name} ended {pb.JobState.Name(job.state)}: {job.error.message}")
            client.download(f"{job.name}/model", pruned)
            client.download(f"{job.name}/report", report)
        return json.loads(report.read_text())
    finally:
        up.terminate()
        up.wait(60)


# --- client commands (talk to a server: `prunery up`, or `prunery serve` + `prunery worker`) ----------


def _client(args: argparse.Namespace):
    from prunery.client import DEFAULT_RETRY_BUDGET_S, Client
    from prunery.service.api.settings import env_number

    budget = args.retry_budget if args.retry_budget is not None else \
        env_number("PRUNERY_RETRY_BUDGET_S", DEFAULT_RETRY_BUDGET_S, 0.0)
    return Client(args.address or os.environ.get("PRUNERY_ADDRESS", ""),
                  args.token or os.environ.get("PRUNERY_TOKEN", ""), timeout=args.timeout, retry_budget_s=budget)


def _state(job) -> str:
    from prunery.v1 import prunery_pb2 as pb

    return pb.JobState.Name(job.state)


def _print_job(job) -> None:
    line = f"{job.name}  {_state(job)}  {job.progress:.0%}"
    if job.stage:
        line += f"  stage={job.stage}"
    if job.error.message:
        line += f"  error: {job.error.message}"
    print(line)


class _Progress:
    """One line per change, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, event) -> None:
        from prunery.v1 import prunery_pb2 as pb

        width = 30
        done = int(event.progress * width)
        line = (f"[{'#' * done}{'.' * (width - done)}] {event.progress:4.0%} {pb.JobState.Name(event.state)}"
                f" {event.stage}".rstrip())
        if line == self.last:
            return
        self.last = line
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)


def _download_results(client, job, output: str | None, report: str | None) -> None:
    if output:
        client.download(f"{job.name}/model", output)
        print(f"wrote {output}")
    if report:
        client.download(f"{job.name}/report", report)
        print(f"wrote {report}")


def cmd_submit(args: argparse.Namespace) -> int:
    from prunery.spec_proto import spec_to_proto
    from prunery.v1 import prunery_pb2 as pb

    spec = _spec_from(args, args.model, args.dataset or "")  # refuse a bad spec before uploading anything
    if args.dataset:  # a dataset the workers would refuse (a missing input, a wrong dtype) is refused before upload
        from prunery.core import load_program
        from prunery.core.data import fit_to_program, load_dataset

        fit_to_program(load_dataset(args.dataset), load_program(args.model))
    with _client(args) as client:
        artifact = client.upload(args.model, labels=dict(args.label or []))
        dataset = client.upload(args.dataset, kind=pb.DATASET, labels=dict(args.label or [])).name \
            if args.dataset else None
        spec = spec_to_proto(spec.replace(model=artifact.name, dataset=dataset or ""))
        job = client.create_job(spec, labels=dict(args.label or []), queue=args.queue)
        print(job.name)
        if not args.wait:
            return 0
        progress = _Progress()
        job = client.wait(job.name, on_event=progress)
        progress.close()
        _print_job(job)
        if job.state != pb.SUCCEEDED:
            return 1
        for warning in job.report["warnings"] if "warnings" in job.report else ():
            print(f"warning: {warning}")  # a flat loss curve, a result slower than its input
        _download_results(client, job, args.output, args.report)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from prunery.v1 import prunery_pb2 as pb

    with _client(args) as client:
        if args.action == "list":
            for job in client.list_jobs(filter=args.filter or ""):
                _print_job(job)
            return 0
        if not args.job:
            raise ValueError(f"`prunery jobs {args.action}` needs a job id")
        if args.action == "get":
            job = client.get_job(args.job)
            if args.json:
                from google.protobuf.json_format import MessageToJson

                print(MessageToJson(job))
            else:
                _print_job(job)
            return 0
        if args.action == "cancel":
            _print_job(client.cancel_job(args.job))
            return 0
        for event in client.watch_job(args.job):  # watch
            print(f"{event.sequence:4d} {pb.JobState.Name(event.state):10s} {event.progress:4.0%} "
                  f"{event.stage} {event.message}".rstrip())
        job = client.get_job(args.job)
        return 0 if job.state == pb.SUCCEEDED else 1


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job)
        _download_results(client, job, args.output, args.report)
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from prunery.service.api.settings import Settings
    from prunery.service.store import tokens

    settings = Settings.from_env()
    url = args.database_url or settings.database_url
    default = tokens.sqlite_path(url)
    if not (args.database_url or os.environ.get("PRUNERY_DATABASE_URL")) and default is not None \
            and not default.exists():
        # the embedded default under ./prunery-data: made by `prunery up`/`serve`, never by a token command
        raise ValueError(f"no database: pass --database-url URL or set PRUNERY_DATABASE_URL (the default {default} "
                         "does not exist)")
    if args.action == "create":
        print(tokens.create(url, args.tenant, migrate=settings.migrate))
    else:
        if not args.token_value:
            raise ValueError("`prunery tokens revoke` needs the token (or its id)")
        if not tokens.revoke(url, args.token_value):
            raise ValueError("no such token")
        print("revoked")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from prunery.service.api.server import serve

    serve()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from prunery.worker.app import main as worker_main

    worker_main([])  # one job at a time, a fresh process per job: see prunery.worker.app
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from prunery.stack import run_embedded

    return run_embedded(Path(args.data_dir), args.port)


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="server host:port (default: $PRUNERY_ADDRESS)")
    p.add_argument("--token", help="bearer token (default: $PRUNERY_TOKEN)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    p.add_argument("--retry-budget", type=float, metavar="S",
                   help="retry calls that fail while the server restarts (UNAVAILABLE, ...) for up to S seconds "
                        "without progress (default: $PRUNERY_RETRY_BUDGET_S, else 60; 0: never retry)")


def _add_spec_options(p: argparse.ArgumentParser, group: str, device: bool = True) -> None:
    """The job spec's options of `group` (`prunery.core.spec`): flags, defaults, choices and help are its
    fields'. `device`: the local device option too (a service job runs on its worker's device)."""
    from prunery.core.spec import PRUNE_GROUP, fields_of

    target = p if group == PRUNE_GROUP else p.add_argument_group("data, sparse training, targets and recovery")
    for f in fields_of(group):
        if not f.metadata["cli"]:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        options: dict = {"dest": f.name, "help": f.metadata["help"]}
        if isinstance(default, bool):
            options["action"] = "store_true"
        else:
            options.update(default=default if default != () else None, metavar=f.metadata["metavar"],
                           type=_OPTION_TYPES[str(f.type).split(" |")[0]])
            if f.metadata["choices"]:
                options["choices"] = f.metadata["choices"]
            if isinstance(default, tuple):
                options["nargs"] = "+"
        target.add_argument(flag, **options)
    if group != PRUNE_GROUP and device:
        target.add_argument("--device", help="cuda or cpu (default: cuda when available)")


_OPTION_TYPES = {"float": float, "int": int, "str": str, "tuple[str, ...]": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunery", description="Structural pruning of torch.export programs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="print the dependency groups of a .pt2 program")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ignore", nargs="+", metavar="GLOB")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="prune a .pt2 program into a smaller one")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--report", help="write the JSON report here")
    _add_spec_options(p, "prune")
    _add_spec_options(p, "recipe")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("up", help="the embedded stack: API and one worker, SQLite, a folder store, no servers")
    p.add_argument("--data-dir", default="prunery-data")
    p.add_argument("--port", type=int, default=50051)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", help="the API server, configured from PRUNERY_* environment variables")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a job worker, configured from PRUNERY_* environment variables")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("submit", help="upload a .pt2 and create a pruning job on a server")
    p.add_argument("model")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends, then download")
    p.add_argument("-o", "--output", help="with --wait: write the pruned model here")
    p.add_argument("--report", help="with --wait: write the report here")
    p.add_argument("--label", nargs="+", type=lambda kv: tuple(kv.split("=", 1)), metavar="KEY=VALUE")
    p.add_argument("--queue", default="", help="worker pool (GPU class) to run on, one of the server's queues "
                   "(default: the server's default queue)")
    _add_spec_options(p, "prune")
    _add_spec_options(p, "recipe", device=False)
    _add_client_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, watch or cancel jobs")
    p.add_argument("action", choices=["list", "get", "watch", "cancel"])
    p.add_argument("job", nargs="?")
    p.add_argument("--filter", help='e.g. "state=RUNNING AND labels.team=vision"')
    p.add_argument("--json", action="store_true")
    _add_client_options(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("download", help="download a finished job's pruned model and report")
    p.add_argument("job")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--report")
    _add_client_options(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "tokens", help="create or revoke a tenant's API token (talks to the database)",
        description="create prints a new token for --tenant; revoke TOKEN revokes a token given it or its id. "
                    "create first migrates the database to the schema's head, as `prunery serve` does by default, so "
                    "the first token of a new deployment can be made before its first server starts (refusing would "
                    "only add a step: serve migrates anyway). PRUNERY_MIGRATE=0 turns that off for both, for a shared "
                    "database whose migrations are run on their own; an unmigrated database is then refused in one "
                    "line. revoke never creates nor migrates a database. A command that fails leaves no database "
                    "file behind.")
    p.add_argument("action", choices=["create", "revoke"])
    p.add_argument("token_value", nargs="?", metavar="TOKEN")
    p.add_argument("--tenant", default="default")
    p.add_argument("--database-url", help="default: $PRUNERY_DATABASE_URL")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("demo", help="export a small ResNet, prune it through the embedded service, reload it")
    p.add_argument("--model", default="resnet_basic", help="the model to prune: resnet_basic (the only one)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--out", default="prunery-demo")
    p.add_argument("--local", action="store_true", help="prune in this process instead of through the service")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return 141
    except (ValueError, OSError, RuntimeError, LookupError) as e:
        # one line a person can act on; the engine's errors already name what is wrong
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"prunery: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
