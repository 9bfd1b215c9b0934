"""`prunery` command line: the engine on local files (analyze, prune) and a self-contained demo."""

from __future__ import annotations

import argparse
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


def _config_from(args: argparse.Namespace):
    from prunery.core import PruneConfig

    return PruneConfig(
        ratio=args.ratio,
        importance=args.importance,
        global_pruning=args.global_pruning,
        round_to=args.round_to,
        max_ratio=args.max_ratio,
        ignore=tuple(args.ignore or ()),
        seed=args.seed,
    )


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


def cmd_prune(args: argparse.Namespace) -> int:
    from prunery.core import load_program, prune

    config = _config_from(args)
    config.validate()
    ep = load_program(args.model)
    result = prune(ep, config)
    out = Path(args.output)
    _save_program(result.program, out)
    if args.report:
        _write_json(result.report, Path(args.report))
    _print_summary(result.report, out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from prunery import zoo
    from prunery.core import PruneConfig, load_program, prune

    out = Path(args.out)
    model_path = out / f"{args.model}.pt2"
    _save_program(zoo.export(args.model), model_path)
    print(f"exported zoo model {args.model!r} to {model_path}")
    ep = load_program(model_path)  # through the safe intake, as an upload would be
    result = prune(ep, PruneConfig(ratio=args.ratio))
    pruned_path = out / f"{args.model}-pruned.pt2"
    _save_program(result.program, pruned_path)
    _write_json(result.report, out / "report.json")
    _print_summary(result.report, pruned_path)
    x = zoo.ZOO[args.model].example_inputs(4)
    y = load_program(pruned_path).module()(*x)
    with torch.no_grad():
        print(f"reloaded pruned model runs at batch 4: output shape {tuple(y.shape)}; report: {out / 'report.json'}")
    return 0


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio", type=float, required=True, help="fraction of each group's channels to remove")
    p.add_argument("--importance", default="l2", choices=["l1", "l2", "bn", "random"])
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="one threshold across groups on the relative score")
    p.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of N")
    p.add_argument("--max-ratio", type=float, default=1.0, help="never remove more than this from a group")
    p.add_argument("--ignore", nargs="+", metavar="GLOB", help="parameter-name globs to leave untouched")
    p.add_argument("--seed", type=int, default=0, help="seed for --importance random")


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
    _add_prune_options(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("demo", help="export a zoo model, prune it, reload it: the engine end to end")
    p.add_argument("--model", default="resnet_basic")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--out", default="prunery-demo")
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
    except (ValueError, OSError, RuntimeError) as e:
        # one line a person can act on; the engine's errors already name what is wrong
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"prunery: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
