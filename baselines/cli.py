"""``bench synth``: the synthetic-data baselines from the command line (kept light: no torch at import).

    bench synth datasetddpm --dataset cat15 --num 50000                  # Table 2's DatasetDDPM row
    bench synth datasetddpm --dataset demo --num 1000 --sampler ddim --sample-steps 25 --deeplab-arch small
    bench synth datasetddpm --dataset cat15 --sizes 10000,20000,30000,40000,50000   # Table 6
    bench synth datasetddpm --dataset cat15 --num 50000 --train probe     # Table 3 (probe on synthetic images)
    bench synth datasetgan --dataset horse21 --weights G.pkl --annotated annotated/ --num 50000

Each (split seed, size) gives one result JSON under ``--out``; ``bench report`` shows the rows.
With ``--launcher local|slurm`` each split seed is one job of a job array (``bench.launch``); with
``--nproc N`` DeepLab trains under torchrun on N processes (``baselines.deeplab_ddp``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes a comma list of integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes needs positive integers, got {text!r}")
    return sizes


def add_parser(sub: Any, positive_int: Callable, positive_float: Callable, seeds: Callable) -> None:
    """Register ``bench synth`` on the main parser's subcommands."""
    s = sub.add_parser("synth", help="synthetic-data baselines (DatasetDDPM, DatasetGAN): make a set, train, score")
    s.add_argument("method", help="datasetddpm or datasetgan")
    s.add_argument("--dataset", required=True, help="card name/alias (the real split scores the result)")
    s.add_argument("--num", type=positive_int, default=50000, help="samples to synthesise (default 50000)")
    s.add_argument("--seeds", type=seeds, default=[0], help="split seeds: interpreter split, sampling, DeepLab (default 0)")
    s.add_argument("--split", choices=["resplit", "released"], default="resplit", help="real split (default resplit)")
    s.add_argument("--backbone", default="ddpm", help="datasetddpm: the ADM as name[.tag] (default ddpm, by domain)")
    s.add_argument("--weights", help="datasetddpm: a local ADM checkpoint; datasetgan: a StyleGAN2-ADA .pkl")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="backbone argument, as in bench run")
    s.add_argument("--generator-config", help="datasetgan without --weights: JSON constructor arguments of a "
                   "random-init StyleGAN2 (a pipeline test, never a comparable number)")
    s.add_argument("--annotated", help="datasetgan: folder of annotated generated samples (NAME.npy, NAME.latent.npy)")
    s.add_argument("--released", help="an official released set (.npz, or the .tar.gz holding it) instead of sampling")
    s.add_argument("--sampler", choices=["ancestral", "ddim"], default=None,
                   help="DDPM sampler (default ancestral, the official flag's intent; ddim is what its script ran)")
    s.add_argument("--use-ddim", help="the official flag, parsed strictly: False/True (never by truthiness)")
    s.add_argument("--sample-steps", type=positive_int, help="respace sampling to this many steps (default: all)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--truncation-psi", type=float, default=0.7, help="datasetgan truncation psi (default 0.7)")
    s.add_argument("--truncation-cutoff", type=positive_int, default=7, help="W+ rows truncated (default 7)")
    s.add_argument("--label-input", choices=["float", "quantised"], default="float",
                   help="label the float sample (official) or the stored uint8 image")
    s.add_argument("--shard-size", type=positive_int, default=100, help="samples per shard (default 100)")
    s.add_argument("--batch-size", type=positive_int, default=16, help="samples per generator batch (default 16)")
    s.add_argument("--train", choices=["deeplab", "probe", "none"], default="deeplab",
                   help="what to train on the set (default deeplab; probe = Table 3; none = only make the set)")
    s.add_argument("--sizes", type=_sizes, help="set sizes to train on (Table 6), each <= --num (default: --num)")
    s.add_argument("--filter", choices=["paper", "official_offset30"], default="paper",
                   help="drop the most uncertain portion (paper) or the official scripts' index rule")
    s.add_argument("--portion", type=float, default=0.1, help="portion dropped as most uncertain (default 0.1)")
    s.add_argument("--deeplab-arch", choices=["resnet101", "small"], default="resnet101",
                   help="DeepLabV3-ResNet101 (paper) or a small variant on the same code path (CPU demos)")
    s.add_argument("--epochs", type=positive_int, default=20, help="DeepLab epochs (default 20)")
    s.add_argument("--deeplab-batch-size", type=positive_int, default=8, help="DeepLab batch (default 8)")
    s.add_argument("--lr", type=positive_float, default=1e-3, help="DeepLab Adam learning rate (default 1e-3)")
    s.add_argument("--deeplab-backbone-init", choices=["imagenet", "random"], default=None,
                   help="ImageNet ResNet-101 (default for resnet101; random is flagged as not comparable)")
    s.add_argument("--imagenet-weights", help="local resnet101-63fe2227.pth (default: download torchvision's)")
    s.add_argument("--selection", choices=["lowest_epoch", "lexicographic"], default="lowest_epoch",
                   help="epoch ties: lowest epoch, or the official lexicographic visiting order")
    s.add_argument("--amp", action="store_true", help="CUDA: mixed precision for DeepLab")
    s.add_argument("--workers", type=int, default=0, help="CUDA: DataLoader workers for DeepLab (default 0)")
    s.add_argument("--nproc", type=positive_int, default=1,
                   help="DeepLab data-parallel processes under torchrun (DDP; one per GPU; divides the batch)")
    s.add_argument("--probe-images", type=positive_int, help="--train probe: kept samples to train on (default: the card's train count)")
    s.add_argument("--probe-backbone", help="--train probe: backbone of the probe (default: the set's ddpm)")
    s.add_argument("--name", help="row label (default: the method; '@SIZE' is appended for several sizes)")
    s.add_argument("--out", default="reports", help="results root (default reports/)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    s.add_argument("--max-memory", type=positive_float, default=4.0, metavar="GB", help="memory budget (default 4)")
    s.add_argument("--overwrite", action="store_true", help="replace a result of another configuration")
    s.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    from bench.launch import add_arguments as add_launch_arguments

    add_launch_arguments(s)
    s.set_defaults(func=cmd_synth)


def _sampler(args: argparse.Namespace) -> str:
    from bench.errors import BenchError

    if args.use_ddim is None:
        return args.sampler or "ancestral"
    from backbones._diffusion_sampling import sampler_kind_from_flag

    kind = sampler_kind_from_flag(args.use_ddim)
    if args.sampler is not None and args.sampler != kind:
        raise BenchError(f"--sampler {args.sampler} contradicts --use-ddim {args.use_ddim} ({kind})")
    return kind


def _plan(args: argparse.Namespace, resolve: bool = True) -> dict:
    """Everything checked and derived before any work (``resolve=False``: the device is the job's business)."""
    from bench.cards import get_card
    from bench.cli import check_writable, parse_options
    from bench.errors import BenchError
    from bench.runner import resolve_device

    card = get_card(args.dataset)
    sizes = args.sizes or [args.num]
    if max(sizes) > args.num:
        raise BenchError(f"--sizes {max(sizes)} is more than --num {args.num}")
    options = parse_options(args.set or [])
    gan = args.method == "datasetgan"
    if args.weights and not Path(args.weights).is_file():
        raise BenchError(f"--weights {args.weights}: no such file")
    if args.weights and not gan:
        options["checkpoint"] = args.weights
    generator_kwargs = {}
    if args.generator_config:
        try:
            generator_kwargs = json.loads(args.generator_config)
        except json.JSONDecodeError as err:
            raise BenchError(f"--generator-config is not valid JSON: {err}") from err
    if args.train != "none":
        check_writable(Path(args.out))
    device = resolve_device(args.device) if resolve else args.device
    deeplab = None
    if args.train == "deeplab":
        from baselines.deeplab_train import DeepLabConfig

        init = args.deeplab_backbone_init or ("imagenet" if args.deeplab_arch == "resnet101" else "random")
        deeplab = DeepLabConfig(arch=args.deeplab_arch, epochs=args.epochs, batch_size=args.deeplab_batch_size,
                                lr=args.lr, backbone_init=init, amp=args.amp, workers=args.workers,
                                selection=args.selection, nproc=args.nproc)
    label = args.name or (args.method if args.train == "deeplab" else f"ddpm-on-{args.method}")
    return {"card": card, "sizes": sizes, "options": options, "gan": gan, "generator_kwargs": generator_kwargs,
            "device": device, "deeplab": deeplab, "label": label}


def _outputs(args: argparse.Namespace, plan: dict, seed: int) -> dict[int, str]:
    """``{size: result path relative to --out}`` of one seed."""
    from bench.results import run_path

    if args.train == "none":
        return {}
    seed_name = seed if args.split == "resplit" else "released"
    return {size: run_path(Path("."), plan["card"].name, plan["label"] + (f"@{size}" if len(plan["sizes"]) > 1 else ""),
                           seed_name).as_posix() for size in plan["sizes"]}


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """One seed of ``bench synth``: make (or resume) its set, train and score each size.

    Returns ``{result path relative to --out: run key}`` (a unit of ``bench.launch``).
    """
    from baselines.synth import SynthSpec, describe, synthesize
    from baselines.synth_train import TrainSpec, train_on_set

    plan = _plan(args)
    card, device, progress = plan["card"], plan["device"], not args.no_progress
    spec = SynthSpec(method=args.method, dataset=args.dataset, num=args.num, seed=seed, backbone=args.backbone,
                     backbone_kwargs=plan["options"], generator=args.weights if plan["gan"] else None,
                     generator_kwargs=plan["generator_kwargs"], annotated=args.annotated, sampler=_sampler(args),
                     sample_steps=args.sample_steps, eta=args.eta, truncation_psi=args.truncation_psi,
                     truncation_cutoff=args.truncation_cutoff, label_input=args.label_input,
                     shard_size=args.shard_size, batch_size=args.batch_size, device=device,
                     max_memory_gb=args.max_memory, progress=progress)
    if args.released:
        from baselines.released import import_released

        synth_set = import_released(Path(args.released), args.method, args.dataset, shard_size=args.shard_size,
                                    progress=progress)
    else:
        synth_set = synthesize(spec)
    print(json.dumps(describe(synth_set)), file=sys.stderr, flush=True)
    keys = {}
    for size, output in _outputs(args, plan, seed).items():
        label = Path(output).parent.name
        result = train_on_set(synth_set, TrainSpec(
            dataset=args.dataset, seed=seed, split=args.split, model=args.train, max_data=size, rule=args.filter,
            portion=args.portion, deeplab=plan["deeplab"], imagenet_weights=args.imagenet_weights,
            probe_images=args.probe_images, probe_backbone=args.probe_backbone, name=label, out=Path(args.out),
            device=device, max_memory_gb=args.max_memory, progress=progress, overwrite=args.overwrite))
        keys[output] = result["run_key"]
        print(f"{label} on {card.name}, seed {seed}, {size} samples: mIoU official "
              f"{100 * result['miou']['official']:.2f}  standard {100 * result['miou']['standard']:.2f}",
              file=sys.stderr, flush=True)
    return keys


def _absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """A copy whose file and folder arguments are absolute: a job may start in another directory."""
    import copy

    args = copy.copy(args)
    for name in ("out", "weights", "annotated", "released", "imagenet_weights", "dataset"):
        value = getattr(args, name)
        if value and (name == "out" or Path(value).exists()):
            setattr(args, name, str(Path(value).resolve()))
    return args


def _launched(args: argparse.Namespace, launch) -> int:
    """``bench synth --launcher local|slurm``: one job per split seed, writing into the same results tree."""
    from bench import report
    from bench.launch import Unit, local_width, submit

    plan = _plan(args, resolve=False)
    job_args = _absolute_paths(args)
    job_args.no_progress = True
    units = []
    for seed in args.seeds:
        outputs = list(_outputs(args, plan, seed).values())
        name = f"synth/{plan['card'].name}/{plan['label']}/seed{seed}"
        units.append(Unit(name=name, fn=run_seed, args=(job_args, seed), outputs=outputs))
    launch, threads = local_width(launch, 1)  # a seed is heavy (a generator sampling): one at a time unless asked
    submit(units, Path(args.out), launch, command=" ".join(sys.argv), overwrite=args.overwrite, threads=threads)
    if launch.launcher == "local" and args.train != "none":
        print(report.render(Path(args.out), "md"))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Make each seed's set, then train and score on each size; prints the report at the end."""
    from bench import report
    from bench.launch import options_from_args

    launch = options_from_args(args)
    if launch.launcher != "inprocess":
        return _launched(args, launch)
    _plan(args)  # every check before the first seed's work
    for seed in args.seeds:
        run_seed(args, seed)
    if args.train != "none":
        print(report.render(Path(args.out), "md"))
    return 0
