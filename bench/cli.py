"""The ``bench`` command line: ls, run, report, download, check, pretrain, synth (``baselines.cli``).

A failure prints one ``bench: error: ...`` line, never a traceback (tracebacks are for bugs). Exit
status: 0 success, 2 a usage error (a wrong name, option or value), 1 a failure at run time (a
download, a checkpoint, a data file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from bench.errors import BenchError


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a comma list of integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["blocks=5,6", "fp16=true", "arch={...}"]`` -> plugin keyword arguments.

    Values are read as JSON when they parse (numbers, booleans, objects, lists); a comma list of
    numbers becomes a list; anything else stays a string.

    Example:
        >>> parse_options(["blocks=5,6", "seed=3", "name=x"])
        {'blocks': [5, 6], 'seed': 3, 'name': 'x'}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise BenchError(f"--set expects key=value, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = [json.loads(v) for v in raw.split(",")] if "," in raw else raw
            except json.JSONDecodeError:
                value = raw
        out[key] = value
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    if args.what == "datasets":
        from bench.cards import list_cards

        cards = list_cards()
        if args.json:
            print(json.dumps([c.to_json() for c in cards], indent=1))
            return 0
        print(f"{'name':16} {'aliases':28} {'K':>3} {'ignore':>6} {'mIoU over':>9} {'train':>5} {'test':>5}  domain")
        for c in cards:
            print(f"{c.name:16} {', '.join(c.aliases)[:28]:28} {c.num_classes:3d} {c.ignore_label:6d} "
                  f"{len(c.miou_class_ids):9d} {c.train:5d} {c.test:5d}  {c.domain}")
        return 0
    from bench.registry import get_backbone_class, list_backbones

    rows = []
    for name in list_backbones():
        cls = get_backbone_class(name)
        rows.append({
            "name": name, "aliases": list(cls.aliases), "tags": list(cls.weights),
            "default_tag": cls.default_tag, "module": cls.__module__,
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':12} {'tags':52} module")
    for r in rows:
        print(f"{r['name']:12} {', '.join(r['tags']) or '-':52} {r['module']}")
    return 0


def _run_specs(args: argparse.Namespace) -> list:
    from bench.runner import RunSpec

    options = parse_options(args.set or [])
    if args.weights:
        options["checkpoint"] = args.weights
    backbones = [b for b in args.backbone.split(",") if b]
    if args.name and len(backbones) > 1:
        raise BenchError(f"--name {args.name!r} would label all {len(backbones)} backbones alike; "
                         f"run them one at a time to name them")
    pretrained = [args.pretrained] if not args.random_controls else [True, False]
    return [
        RunSpec(
            backbone=b, dataset=args.dataset, seed=s, pretrained=p, split=args.split,
            backbone_kwargs=options, device=args.device, max_memory_gb=args.max_memory,
            out=Path(args.out), progress=not args.no_progress, name=args.name or "",
            extract_batch=args.batch_size, fit=args.fit, cache_dtype=args.cache_dtype, overwrite=args.overwrite,
            save_masks=getattr(args, "save_masks", 0), probe_precision=getattr(args, "probe_precision", "auto"),
        )
        for b in backbones for p in pretrained for s in (args.seeds if args.split == "resplit" else [0])
        # --random-controls: a backbone without weights has no random-init control distinct from itself
        if p or not args.random_controls or _has_weights(b)
    ]


def _has_weights(name: str) -> bool:
    from bench.registry import get_backbone_class

    return bool(get_backbone_class(name).weights)


def check_writable(folder: Path, option: str = "--out") -> None:
    """Fail now, with one line, if results cannot be written under ``folder`` (not after the runs).

    Example:
        >>> import tempfile
        >>> check_writable(Path(tempfile.mkdtemp()) / "new")
    """
    import os
    import tempfile

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise BenchError(f"{option} {folder}: {existing} is a file, not a folder")
    target = existing if not folder.exists() else folder
    if not os.access(target, os.W_OK | os.X_OK):
        raise BenchError(f"{option} {folder}: {target} is not writable")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BenchError(f"{option} {folder}: cannot write there ({exc.strerror or exc})") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from bench import report, runner
    from bench.cards import get_card
    from bench.registry import check_kwargs, resolve_name

    get_card(args.dataset)  # fail on a wrong name before any work starts
    options = parse_options(args.set or [])
    for name in args.backbone.split(","):
        cls, _, extra = resolve_name(name)
        check_kwargs(cls, {**options, **extra, **({"checkpoint": args.weights} if args.weights else {})})
    if args.weights and not Path(args.weights).exists():  # a file, or a folder (a diffusers model)
        raise BenchError(f"--weights {args.weights}: no such file or folder")
    check_writable(Path(args.out))
    specs = _run_specs(args)
    from bench.launch import options_from_args

    launch = options_from_args(args)
    if launch.launcher != "inprocess":
        return _run_launched(args, specs, launch)
    from bench.parallel import auto_jobs, run_all

    jobs = args.jobs if args.jobs else auto_jobs(len(specs), args.device, args.max_memory)
    if jobs > 1:
        for spec in specs:
            spec.progress = False  # several processes' bars would garble one terminal
        print(f"{len(specs)} runs in {jobs} parallel processes", file=sys.stderr)

    def done(i: int, spec, result: dict) -> None:
        tag = "random init" if not spec.pretrained else "pretrained"
        print(f"[{i}/{len(specs)}] {spec.backbone} ({tag}) on {spec.dataset}, seed {spec.seed}: mIoU official "
              f"{100 * result['miou']['official']:.2f}  standard {100 * result['miou']['standard']:.2f}",
              file=sys.stderr, flush=True)

    run_all(specs, jobs, done)
    print(report.render(Path(args.out), "md"))
    return 0


def _run_launched(args: argparse.Namespace, specs: list, launch: Any) -> int:
    """``bench run --launcher local|slurm``: the runs as submitit jobs writing into the same results tree."""
    from bench import report
    from bench.launch import local_width, run_units, submit
    from bench.parallel import auto_jobs

    launch, threads = local_width(launch, auto_jobs(len(specs), args.device, args.max_memory))
    submit(run_units(specs, Path(args.out)), Path(args.out), launch, command=" ".join(sys.argv),
           threads=threads, overwrite=args.overwrite)
    if launch.launcher == "local":
        print(report.render(Path(args.out), "md"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench import report

    if args.page or args.redraw:  # the Markdown page with every analysis folder (bench.report.write_page)
        if args.redraw:
            for path in report.redraw_figures(Path(args.out)):
                print(f"redrew {path}", file=sys.stderr)
        if args.page:
            check_writable(Path(args.page).parent, "--page")
            print(report.write_page(Path(args.out), Path(args.page), args.variant))
        return 0
    text = report.render(Path(args.out), args.format, args.variant)
    if args.output:
        check_writable(Path(args.output).parent, "--output")
        from bench.results import write_text_atomic

        write_text_atomic(Path(args.output), text)
    else:
        print(text, end="")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    if not args.dataset and not args.backbone:
        raise BenchError("bench download needs --dataset NAME and/or --backbone NAME[.TAG]")
    if args.dataset:
        from bench.data import download_dataset, get_card

        print(download_dataset(get_card(args.dataset), progress=not args.no_progress))
    if args.backbone:
        from bench.registry import create_backbone

        backbone = create_backbone(args.backbone, pretrained=True, device="cpu")
        print(f"{args.backbone}: weights sha256 {backbone.weights_sha256() or '(none)'}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bench.check import check_backbone

    for line in check_backbone(args.backbone, evaluate=not args.no_eval, out=Path(args.out) if args.out else None):
        print(line)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from bench.data import unlabeled_images
    from bench.registry import get_backbone_class

    cls = get_backbone_class(args.backbone)
    if not hasattr(cls, "pretrain"):
        raise BenchError(f"backbone {cls.name!r} has no pretraining recipe (bench pretrain supports plugins with .pretrain)")
    options = parse_options(args.set or [])
    path = cls.pretrain(
        images=unlabeled_images(args.dataset), out_dir=Path(args.out), steps=args.steps,
        batch_size=args.batch_size, seed=args.seed, device=args.device, **options,
    )
    print(path)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    import importlib

    from bench.analyses import ANALYSES

    return importlib.import_module(ANALYSES[args.analysis][0]).main(args)


def _add_analyze_parser(sub: Any, argv: Sequence[str]) -> None:
    """``bench analyze NAME``: one subcommand per analysis; its module loads only when it is asked for."""
    import importlib

    from bench.analyses import ANALYSES

    an = sub.add_parser("analyze", help="the paper's analyses and figures (bench analyze NAME --help)")
    which = an.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS", help="which analysis to run")
    wanted = next((a for a in argv if a in ANALYSES), None) if "analyze" in argv else None
    for name, (module, where) in ANALYSES.items():
        one = which.add_parser(name, help=where)
        one.set_defaults(func=cmd_analyze)
        if name == wanted:  # only the requested analysis imports its module to declare its options
            try:
                importlib.import_module(module).add_arguments(one)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise


def _cmd_status(args: argparse.Namespace) -> int:
    from bench.status import cmd_status

    return cmd_status(args)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``bench`` command (``argv`` picks which analysis declares its options).

    Example:
        >>> build_parser().parse_args(["ls", "datasets"]).what
        'datasets'
    """
    import bench

    p = argparse.ArgumentParser(prog="bench", description="Few-shot semantic segmentation benchmark harness.",
                                epilog="exit status: 0 ok, 1 run-time failure (download, checkpoint, data), "
                                       "2 usage error, 130 interrupted")
    p.add_argument("--version", action="version", version=f"bench {bench.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list backbones or datasets")
    ls.add_argument("what", choices=["backbones", "datasets"], help="what to list")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    run = sub.add_parser("run", help="run backbone(s) on a dataset over seeds and print the table")
    run.add_argument("--backbone", required=True, help="name, name.tag, or a comma list")
    run.add_argument("--dataset", default="demo", help="card name/alias or a folder with card.json (default: demo)")
    run.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="comma list (default 0,1,2,3,4)")
    run.add_argument("--split", choices=["resplit", "released"], default="resplit",
                     help="resplit: pool train+test and re-split from each seed; released: the released folders")
    run.add_argument("--pretrained", type=_bool, default=True, help="false: random weights, an honest control")
    run.add_argument("--random-controls", action="store_true", help="also run each backbone with random weights")
    run.add_argument("--weights", help="a local checkpoint file (plugin argument checkpoint=PATH)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="plugin argument, e.g. blocks=5,6,7")
    run.add_argument("--name", help="row label in reports (default: the backbone name)")
    run.add_argument("--out", default="reports", help="results root (default: reports/)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    run.add_argument("--max-memory", type=_positive_float, default=4.0, metavar="GB",
                     help="memory ceiling for the probe stage, GiB (default 4)")
    run.add_argument("--batch-size", type=_positive_int, default=4, help="images per feature-extraction batch (default 4)")
    run.add_argument("--jobs", type=_positive_int, default=None,
                     help="runs in parallel processes (default: on CPU one per core, within RAM at --max-memory "
                          "each; 1 on a GPU)")
    run.add_argument("--fit", choices=["stretch", "crop"], default="stretch",
                     help="non-square images: stretch to the model's square input and score at the label's own "
                          "resolution (default), or crop the central square")
    run.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16",
                     help="precision of the on-disk feature cache (default float16)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a result of another configuration under the same label (default: refuse)")
    run.add_argument("--probe-precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                     help="precision of the probe's first-layer matmuls (float32 master weights and Adam "
                          "always): auto = bf16 where the CPU (AMX/AVX512-BF16) or GPU computes it natively and "
                          "there are >= 2048 features per pixel, else fp32; fp16 on CUDA only. Part of the run key")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    run.add_argument("--save-masks", type=_positive_int, default=0, metavar="N",
                     help="draw image / ground truth / prediction / uncertainty of the first N test images "
                          "into <out>/analyses/<dataset>/masks/ (output only: not part of the run key)")
    from bench.launch import add_arguments as add_launch_arguments  # light: no submitit at import

    add_launch_arguments(run)
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="done / running / failed / missing units of batches submitted with --launcher")
    st.add_argument("--out", default="reports", help="results root (default: reports/)")
    st.set_defaults(func=_cmd_status)

    rep = sub.add_parser("report", help="collate results into the paper's Table 2 shape")
    rep.add_argument("--out", default="reports", help="results root (default: reports/)")
    rep.add_argument("--format", choices=["md", "csv", "latex"], default="md", help="output format (default md)")
    rep.add_argument("--variant", choices=["official", "standard"], default="official",
                     help="which mIoU (default official); paper values and deltas only for official")
    rep.add_argument("--output", help="write to this file instead of stdout")
    rep.add_argument("--page", metavar="PATH", help="write a Markdown page: Table 2 plus every analysis under "
                                                    "<out>/analyses/ (its CSVs as tables, its figures linked)")
    rep.add_argument("--redraw", action="store_true",
                     help="redraw every analysis figure (PNG) from the CSV/NPZ files in the results tree alone")
    rep.set_defaults(func=cmd_report)

    dl = sub.add_parser("download", help="download a dataset and/or a backbone's weights into the cache")
    dl.add_argument("--dataset", help="card name/alias to download")
    dl.add_argument("--backbone", help="NAME[.TAG] whose official weights to download")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    dl.set_defaults(func=cmd_download)

    chk = sub.add_parser("check", help="run the plugin contract and a 4-image evaluation for a backbone")
    chk.add_argument("--backbone", required=True, help="registered name to check")
    chk.add_argument("--no-eval", action="store_true", help="contract only")
    chk.add_argument("--out", help="where the evaluation writes (default: a temporary folder)")
    chk.set_defaults(func=cmd_check)

    pre = sub.add_parser("pretrain", help="pretrain a backbone on a dataset's unlabeled images")
    pre.add_argument("backbone", help="registered name of a backbone with a pretraining recipe (ddpm)")
    pre.add_argument("--dataset", required=True, help="card name/alias or a folder of images")
    pre.add_argument("--out", required=True, help="output folder (resumes if it holds a training state)")
    pre.add_argument("--steps", type=_positive_int, default=10000, help="optimiser steps (default 10000)")
    pre.add_argument("--batch-size", type=_positive_int, default=16, help="images per step (default 16)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    pre.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    pre.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. num_channels=64 or lr=2e-4")
    pre.set_defaults(func=cmd_pretrain)

    _add_analyze_parser(sub, list(sys.argv[1:] if argv is None else argv))

    from baselines.cli import add_parser as add_synth_parser  # light: argparse only

    add_synth_parser(sub, _positive_int, _positive_float, _seeds)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bench`` console script.

    Example:
        >>> main(["ls", "backbones"])  # doctest: +SKIP
        0
    """
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"bench: error: {message}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except BrokenPipeError:  # `bench ls datasets | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted; finished runs are kept and the rest resumes on the next call", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
