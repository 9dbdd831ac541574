"""``bench synth``: make a synthetic labelled set (DatasetDDPM / DatasetGAN), resumably.

    plan       source built (generator, split, files checked) -> set key -> set folder
    interpret  the interpreter ensemble: trained like a run's probe, saved once in the set folder
    sample     shard by shard: generate, label by the members' vote, score by JS uncertainty, write

The **set key** hashes everything that decides a sample's bytes: the method, the generator (weights
sha256, architecture, sampler or truncation), the interpreter (its training files, features, probe
and member seeds), the seed, the shard size and the batch size. The number of samples is NOT part of
it: shard k always holds samples ``[k*shard_size, (k+1)*shard_size)`` drawn from its own generator
(``derive_seed(seed, "synth", start)``, D5), so a 1K set is the first shards of the 10K set with the
same key, and a size sweep (Table 6) reuses them. A killed job resumes at the first missing shard
and rewrites nothing; the filter (:mod:`baselines.filtering`) is applied by the consumer.

Example:
    >>> # s = synthesize(SynthSpec("datasetddpm", "demo", num=1000, backbone="ddpm.demo", sampler="ddim", sample_steps=25))
    >>> # s.num, s.scores().shape, s.sample(0)[0].shape   -> 1000, (1000,), (64, 64, 3)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baselines.shards import ShardStore
from bench.errors import BenchError
from bench.fingerprint import digest

SYNTH_VERSION = "bench.synth/1"


@dataclass
class SynthSpec:
    """Everything that defines a synthetic set (and how fast it is made).

    Example:
        >>> SynthSpec("datasetddpm", "demo", num=200).shard_size
        100
    """

    method: str  # datasetddpm | datasetgan
    dataset: str
    num: int
    seed: int = 0
    backbone: str = "ddpm"  # datasetddpm: the ADM (name[.tag]); its features label the samples
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    generator: str | None = None  # datasetgan: a StyleGAN2-ADA snapshot .pkl; None: random init (tests)
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    annotated: str | None = None  # datasetgan: annotated generated samples (NAME.npy + NAME.latent.npy)
    sampler: str = "ancestral"  # D4: ancestral (the flag's intent) | ddim (what the official script runs)
    sample_steps: int | None = None  # None: all diffusion steps; else respaced
    eta: float = 0.0
    truncation_psi: float = 0.7  # D15
    truncation_cutoff: int = 7
    label_input: str = "float"  # D17: the float sample (official) | quantised
    shard_size: int = 100
    batch_size: int = 16
    members: int = 10
    device: str = "cpu"
    max_memory_gb: float = 4.0
    cache: Path | None = None  # feature cache root (default $BENCH_HOME/features)
    root: Path | None = None  # where sets live (default $BENCH_HOME/synth)
    progress: bool = True

    def check(self) -> None:
        """One-line errors before any work."""
        from baselines.sources import METHODS

        if self.method not in METHODS:
            from difflib import get_close_matches

            near = get_close_matches(self.method, list(METHODS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise BenchError(f"unknown synthetic-data method {self.method!r} (known: {', '.join(METHODS)}){hint}")
        for name in ("num", "shard_size", "batch_size", "members"):
            if int(getattr(self, name)) < 1:
                raise BenchError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num % self.shard_size:
            raise BenchError(f"--num {self.num} is not a multiple of the shard size {self.shard_size}: shards are "
                             f"always whole so that a larger set extends a smaller one; use --num "
                             f"{(self.num // self.shard_size + 1) * self.shard_size} or another --shard-size")


@dataclass
class SynthSet:
    """A finished set: its folder, key, identity and the first ``num`` samples."""

    root: Path
    key: str
    num: int
    shard_size: int
    identity: dict
    weights_source: str
    spec: dict = field(default_factory=dict)  # the SynthSpec that made it (spec_dict), for consumers

    @property
    def shards(self) -> ShardStore:
        return ShardStore(self.root)

    def scores(self) -> np.ndarray:
        """Image uncertainty of samples ``0..num-1``, in sample order."""
        parts = [s for idx, s in self.shards.iter_scores() if idx[0] < self.num]
        return np.concatenate(parts)[: self.num]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], label uint8 [H, W]) of sample ``index``."""
        if not 0 <= index < self.num:
            raise BenchError(f"sample {index} is outside the set's {self.num} samples")
        start = index // self.shard_size * self.shard_size
        return self.shards.read_sample(start, index - start)


def _write_json_once(path: Path, data: dict) -> None:
    """Write the set's identity the first time; later runs must find the same one."""
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    if path.exists():
        if json.loads(path.read_text()) != json.loads(text):
            raise BenchError(f"{path} describes another set than its folder name says; delete {path.parent}")
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_interpreter(path: Path, ensemble: Any, members: list) -> None:
    from safetensors.torch import save_file

    meta = json.dumps({"in_dim": ensemble.in_dim, "num_classes": ensemble.num_classes, "members": ensemble.members,
                       "hidden": list(ensemble.hidden), "member_info": members}, sort_keys=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}
    save_file(state, str(tmp), metadata={"bench": meta})
    os.replace(tmp, path)


def _load_interpreter(path: Path, seeds: list[int]) -> Any:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bench.probe import EnsembleMLP

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["bench"])
    ensemble = EnsembleMLP(meta["in_dim"], meta["num_classes"], meta["members"], tuple(meta["hidden"]), seeds)
    ensemble.load_state_dict(load_file(str(path)))
    return ensemble.eval()


def set_folder(spec: SynthSpec, source: Any) -> tuple[str, dict, Path]:
    """(set key, identity, folder) of the set ``spec`` describes; cheap (no model is run)."""
    from bench.hub import cache_dir

    identity = {
        "version": SYNTH_VERSION, "method": spec.method, "dataset": source.card.name, "seed": spec.seed,
        "source": source.config(), "interpreter": digest(source.interpreter_key(), 32),
        "shard_size": spec.shard_size, "batch_size": spec.batch_size, "image_size": source.image_size,
        "num_classes": source.card.num_classes,
    }
    key = digest(identity, 20)
    root = Path(spec.root) if spec.root else cache_dir("synth")
    return key, identity, root / f"{spec.method}-{source.card.name}-{key}"


def synthesize(spec: SynthSpec) -> SynthSet:
    """Make (or finish, or reuse) the set: every shard of ``[0, num)`` exists when this returns."""
    from baselines.sources import METHODS, to_uint8
    from bench.probe import image_uncertainty
    from bench.progress import progress
    from bench.runner import fit_probe, label_image
    from bench.seeding import derive_seed

    spec.check()
    source = METHODS[spec.method](spec)
    key, identity, root = set_folder(spec, source)
    shards = ShardStore(root)
    _write_json_once(root / "set.json", identity)
    shards.clean_partial()
    starts = range(0, spec.num, spec.shard_size)
    todo = [s for s in starts if s not in set(shards.done_starts())]
    for start in shards.done_starts():
        if start < spec.num and todo:  # resuming: a shard from before must be whole and unaltered
            shards.verify(start)
    result = SynthSet(root, key, spec.num, spec.shard_size, identity, source.weights_source, spec_dict(spec))
    if not todo:
        return result

    interpreter = root / "interpreter.safetensors"
    seeds = source.member_seeds()
    if interpreter.exists():
        ensemble = _load_interpreter(interpreter, seeds)
    else:
        data = source.interpreter_data()
        fitted = fit_probe(data.store, data.ids, data.labels, source.card, seeds=seeds, members=spec.members,
                           max_memory_gb=spec.max_memory_gb, device=spec.device, progress=spec.progress)
        ensemble = fitted["ensemble"].eval()
        _save_interpreter(interpreter, ensemble, fitted["members"])
    cache_dtype = torch.float16  # label with the precision the interpreter was trained on (the fp16 cache)
    size = (source.image_size, source.image_size)
    t0 = time.time()
    timing = {"generate_s": 0.0, "label_s": 0.0, "write_s": 0.0, "samples": 0}
    with progress(total=len(todo) * spec.shard_size, desc=f"{spec.method} samples", unit="img",
                  enabled=spec.progress) as bar:
        for start in todo:
            generator = torch.Generator().manual_seed(derive_seed(spec.seed, "synth", start))
            images, labels, scores = [], [], []
            for offset in range(0, spec.shard_size, spec.batch_size):
                count = min(spec.batch_size, spec.shard_size - offset)
                t = time.perf_counter()
                x, maps = source.generate(count, generator)  # sampling + the interpreter's features
                images.append(to_uint8(x))
                timing["generate_s"] += time.perf_counter() - t
                t = time.perf_counter()
                for b in range(count):
                    one = [m[b].detach().to("cpu", cache_dtype).float().permute(1, 2, 0) for m in maps]
                    vote, js = label_image(ensemble, one, size, max_memory_gb=spec.max_memory_gb, device=spec.device)
                    labels.append(vote.numpy().astype(np.uint8))
                    scores.append(image_uncertainty(js))
                timing["label_s"] += time.perf_counter() - t
                bar.update(count)
            t = time.perf_counter()
            # the thread count goes with the shard: float sums, and so a few labels, depend on it
            # (a resume with another count is valid, and each shard says what made it)
            shards.write(start, np.concatenate(images), np.stack(labels), np.asarray(scores, np.float32),
                         meta={"set": key, "torch_threads": torch.get_num_threads()})
            timing["write_s"] += time.perf_counter() - t
            timing["samples"] += spec.shard_size
    result.seconds = time.time() - t0  # type: ignore[attr-defined]
    result.timing = timing  # type: ignore[attr-defined]  # this call's work only (a resumed set: the rest)
    return result


def describe(s: SynthSet) -> dict:
    """A JSON summary of a set (printed by ``bench synth``)."""
    scores = s.scores()
    return {"folder": str(s.root), "key": s.key, "num": s.num, "shards": len(range(0, s.num, s.shard_size)),
            "method": s.identity["method"], "dataset": s.identity["dataset"],
            "score_mean": round(float(scores.mean()), 4), "score_max": round(float(scores.max()), 4)}


def spec_dict(spec: SynthSpec) -> dict:
    """The spec as JSON (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
