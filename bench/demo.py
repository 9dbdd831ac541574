"""The built-in demo domain: procedurally drawn creature scenes with part labels.

Each 64x64 scene shows one four-legged creature standing on the ground under the sky, with a ball
somewhere (in the air or on the ground). Nine classes, several of them a few pixels wide:

    0 sky, 1 ground, 2 body, 3 head, 4 ear, 5 eye, 6 leg, 7 tail, 8 ball

Why it looks like this: a newcomer trains a small DDPM on these images on a laptop and must then see
its features segment them clearly better than raw colour and position (the ``pixels`` backbone). So:

- every region takes its colour from ONE shared palette, plus a texture from one shared set, so the
  same colours and textures appear in every class: a pixel's colour says nothing about its class;
  only neighbouring regions are forced to differ, so part boundaries stay visible;
- position, size, facing direction, horizon height, leg swing, head tilt and tail curl all vary, so
  x/y position alone is a weak cue except for the coarse sky-above-ground layout;
- the occlusion order is fixed (sky, ground, ball, tail, legs, body, ears, head, eye), so shape and
  context decide the class, which is what a generative model learns.

Determinism: ``render(seed)`` draws only uniform doubles (``Generator.random``) from
``numpy.random.PCG64(seed)``; NumPy keeps that stream stable across versions (unlike e.g. its normal
or integer samplers), so a given seed gives the same scene on any machine.

Example:
    >>> image, label = render(0)
    >>> image.shape, image.dtype, label.shape, int(label.max()) < NUM_CLASSES
    ((64, 64, 3), dtype('uint8'), (64, 64), True)
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence, overload

import numpy as np

from bench.errors import BenchError

#: bump when the drawing changes: a materialised folder of another version is regenerated
GENERATOR_VERSION = 1

CLASS_NAMES: tuple[str, ...] = ("sky", "ground", "body", "head", "ear", "eye", "leg", "tail", "ball")
NUM_CLASSES: int = len(CLASS_NAMES)
SKY, GROUND, BODY, HEAD, EAR, EYE, LEG, TAIL, BALL = range(NUM_CLASSES)

#: the ONE palette every region draws its colour from (RGB in [0, 1])
PALETTE = np.array(
    [
        (0.80, 0.25, 0.20),  # red
        (0.92, 0.60, 0.16),  # orange
        (0.93, 0.85, 0.32),  # yellow
        (0.30, 0.65, 0.28),  # green
        (0.18, 0.60, 0.60),  # teal
        (0.25, 0.40, 0.82),  # blue
        (0.56, 0.32, 0.68),  # purple
        (0.50, 0.35, 0.20),  # brown
        (0.90, 0.90, 0.85),  # off-white
        (0.22, 0.22, 0.26),  # charcoal
    ]
)

#: regions that may touch each other get different palette colours so that boundaries stay visible
_MUST_DIFFER: dict[int, tuple[int, ...]] = {
    SKY: (),
    GROUND: (SKY,),
    BALL: (SKY, GROUND),
    TAIL: (SKY, GROUND, BALL),
    LEG: (SKY, GROUND, BALL, TAIL),
    BODY: (SKY, GROUND, BALL, TAIL, LEG),
    EAR: (SKY, GROUND, BODY),
    HEAD: (SKY, GROUND, BODY, EAR, BALL),
    EYE: (HEAD,),
}

#: labeled seeds live far above the unlabeled range, so the DDPM never sees a labeled image
_LABELED_BASE = {"train": 1_000_000_000_000, "test": 2_000_000_000_000}
_UNLABELED_LIMIT = 1_000_000_000_000

#: colours used to show labels in previews (not the scene palette)
_LABEL_COLOURS = np.array(
    [(135, 206, 235), (110, 80, 40), (230, 25, 75), (255, 225, 25), (245, 130, 48),
     (0, 0, 0), (60, 180, 75), (145, 30, 180), (255, 255, 255)],
    dtype=np.uint8,
)


class _Draws:
    """Uniform draws only, from one PCG64 stream (see the module docstring on stability)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(self._rng.random())

    def index(self, n: int) -> int:
        return min(int(self._rng.random() * n), n - 1)

    def chance(self, p: float) -> bool:
        return float(self._rng.random()) < p

    def field(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._rng.random(shape)


# ---- shapes: boolean masks on a grid of pixel centres in unit coordinates (x right, y down) ----------

def _ellipse(xx, yy, cx, cy, ax, ay, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _capsule(xx, yy, x0, y0, x1, y1, radius):
    """Points within ``radius`` of the segment (x0, y0)-(x1, y1): a thick stroke with round ends."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2 <= radius * radius


def _triangle(xx, yy, p0, p1, p2):
    def side(a, b):
        return (b[0] - a[0]) * (yy - a[1]) - (b[1] - a[1]) * (xx - a[0])

    s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def _curve(xx, yy, p0, p1, p2, radius, pieces=8):
    """A thick quadratic Bezier curve, as a chain of capsules."""
    t = np.linspace(0.0, 1.0, pieces + 1)
    px = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t**2 * p2[0]
    py = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t**2 * p2[1]
    mask = np.zeros(xx.shape, dtype=bool)
    for i in range(pieces):
        mask |= _capsule(xx, yy, px[i], py[i], px[i + 1], py[i + 1], radius)
    return mask


# ---- textures: a brightness pattern in [-1, 1] chosen from one shared set for every region -----------

def _texture(draw: _Draws, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    kind = draw.index(6)
    period = draw.uniform(3.0, 7.0) / size  # stripes 3-7 pixels wide: visible but not a class cue
    phase = draw.uniform(0.0, 2 * np.pi)
    if kind == 0:  # flat
        return np.zeros_like(xx)
    if kind == 1:  # horizontal stripes
        return np.sin(2 * np.pi * yy / period + phase)
    if kind == 2:  # vertical stripes
        return np.sin(2 * np.pi * xx / period + phase)
    if kind == 3:  # spots
        return np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period)
    if kind == 4:  # a smooth gradient in a random direction
        angle = draw.uniform(0.0, 2 * np.pi)
        return np.clip(2.0 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)), -1.0, 1.0)
    # blotches: coarse random values, bilinearly interpolated (pixel centres in [0, 1] -> grid 0..7)
    coarse = draw.field((9, 9)) * 2.0 - 1.0
    gx, gy = xx[0] * 8.0, yy[:, 0] * 8.0
    ix, iy = np.minimum(gx.astype(int), 7), np.minimum(gy.astype(int), 7)
    fx, fy = (gx - ix)[None, :], (gy - iy)[:, None]
    top = coarse[iy][:, ix] * (1 - fx) + coarse[iy][:, ix + 1] * fx
    bottom = coarse[iy + 1][:, ix] * (1 - fx) + coarse[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _pick_colours(draw: _Draws) -> dict[int, int]:
    chosen: dict[int, int] = {}
    for cls, avoid in _MUST_DIFFER.items():  # dict order = dependency order (avoided classes first)
        allowed = [c for c in range(len(PALETTE)) if c not in {chosen[a] for a in avoid}]
        chosen[cls] = allowed[draw.index(len(allowed))]
    return chosen


def _layout(draw: _Draws, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """The label map of one scene, painted back to front."""
    label = np.full(xx.shape, SKY, dtype=np.uint8)

    # Ground: a horizon at a random height with a slope and a gentle wave.
    horizon = draw.uniform(0.40, 0.70)
    slope, wave = draw.uniform(-0.12, 0.12), draw.uniform(0.0, 0.03)
    freq, phase = draw.uniform(0.5, 2.0), draw.uniform(0.0, 2 * np.pi)

    def horizon_at(x):
        return horizon + slope * (x - 0.5) + wave * np.sin(2 * np.pi * freq * x + phase)

    label[yy >= horizon_at(xx)] = GROUND

    # The creature's proportions, all relative to the body half-length a.
    facing = 1.0 if draw.chance(0.5) else -1.0
    a = 0.20 * draw.uniform(0.75, 1.25)
    b = a * draw.uniform(0.50, 0.65)
    # Parts are sized so each usually has >= 20 pixels: the protocol (spec 5.3) ignores a class with
    # fewer pixels in a training image, and a part no probe can learn would only add noise to mIoU.
    head_r = max(0.07, b * draw.uniform(0.8, 1.0))
    leg_len = b * draw.uniform(0.9, 1.5)
    front = a * 0.85 + head_r * 1.6  # how far the head reaches ahead of the body centre
    back = a * 1.85  # how far the tail reaches behind it
    low, high = (0.03 + back, 0.97 - front) if facing > 0 else (0.03 + front, 0.97 - back)
    cx = draw.uniform(low, max(low, high))
    # Feet stand on the ground, anywhere between just below the horizon and the bottom edge, low
    # enough that the ear tips stay in the picture (a very tall creature may still be cropped).
    height = leg_len + 0.45 * b + 1.2 * b + 2.3 * head_r
    feet_low = max(float(max(horizon_at(cx - a), horizon_at(cx + a))) + 0.03, height + 0.02)
    feet = draw.uniform(min(feet_low, 0.95), 0.97)
    cy = feet - leg_len - 0.45 * b
    tilt = draw.uniform(-0.15, 0.15)

    # Ball: in the air (a sun-like disc) or resting on the ground; drawn behind the creature.
    if draw.chance(0.85):
        r = draw.uniform(0.05, 0.09)
        bx = draw.uniform(r, 1.0 - r)
        if draw.chance(0.5):
            by = draw.uniform(r, max(r, float(horizon_at(bx)) - r))
        else:
            by = draw.uniform(min(float(horizon_at(bx)) + r, 1.0 - r), 1.0 - r * 0.5)
        label[_ellipse(xx, yy, bx, by, r, r)] = BALL

    # Tail: a thick curve from the rear of the body, curling up or hanging down.
    root = (cx - facing * a * 0.85, cy - b * 0.2)
    tip = (cx - facing * a * draw.uniform(1.4, 1.75), cy - b * draw.uniform(-0.6, 1.8))
    bend = (cx - facing * a * draw.uniform(1.35, 1.8), cy + b * draw.uniform(-0.4, 0.6))
    label[_curve(xx, yy, root, bend, tip, max(0.024, 0.13 * b))] = TAIL

    # Legs: two pairs under the body, each leg a stroke with its own swing.
    leg_r = max(0.02, 0.17 * b)
    for along in (0.62, 0.38, -0.38, -0.62):
        top_x = cx + facing * a * along
        swing = draw.uniform(-0.05, 0.05)
        label[_capsule(xx, yy, top_x, cy, top_x + swing, feet - leg_r, leg_r)] = LEG

    label[_ellipse(xx, yy, cx, cy, a, b, tilt)] = BODY

    # Head: in front of and above the body; ears are drawn first so only their tips stick out.
    hx = cx + facing * a * draw.uniform(0.75, 0.95)
    hy = cy - b * draw.uniform(0.55, 1.2)
    for offset in (-0.45, 0.35):  # angles from straight up, toward the back and the front
        ang = -np.pi / 2 + facing * offset + draw.uniform(-0.15, 0.15)
        half = draw.uniform(0.45, 0.6)  # half-width of the ear base, as an angle on the head circle
        tall = head_r * draw.uniform(1.8, 2.3)
        base0 = (hx + head_r * np.cos(ang - half), hy + head_r * np.sin(ang - half))
        base1 = (hx + head_r * np.cos(ang + half), hy + head_r * np.sin(ang + half))
        apex = (hx + tall * np.cos(ang), hy + tall * np.sin(ang))
        label[_triangle(xx, yy, base0, base1, apex)] = EAR
    label[_ellipse(xx, yy, hx, hy, head_r, head_r * draw.uniform(0.85, 1.0))] = HEAD

    eye_r = max(0.042, 0.3 * head_r)
    ex = hx + facing * head_r * draw.uniform(0.2, 0.4)
    ey = hy - head_r * draw.uniform(0.0, 0.25)
    label[_ellipse(xx, yy, ex, ey, eye_r, eye_r * 1.15)] = EYE
    return label


def render(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: ``(image uint8 [size, size, 3], label uint8 [size, size])``, same seed same scene.

    Example:
        >>> image, label = render(7)
        >>> bool((render(7)[0] == image).all()), sorted(set(label.ravel().tolist()))[:2]
        (True, [0, 1])
    """
    draw = _Draws(int(seed))
    centres = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(centres, centres)
    label = _layout(draw, xx, yy)

    colours = _pick_colours(draw)
    image = np.zeros((size, size, 3))
    for cls in range(NUM_CLASSES):
        # Every class gets its texture draws even when absent, so one part never shifts another's.
        brightness = draw.uniform(0.85, 1.1)
        amplitude = draw.uniform(0.04, 0.11)
        pattern = _texture(draw, xx, yy, size)
        region = label == cls
        if region.any():
            shade = PALETTE[colours[cls]] * brightness
            image[region] = shade + (amplitude * pattern[region])[:, None]
    image += (draw.field((size, size, 3)) - 0.5) * 0.08  # sensor-like noise, +-4 levels of 255
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8), label


def labeled_seed(part: str, index: int) -> int:
    """The fixed seed of labeled image ``index`` of ``part`` ("train" or "test").

    Labeled seeds are disjoint from the unlabeled ones used for DDPM pretraining.

    Example:
        >>> labeled_seed("train", 0) != labeled_seed("test", 0)
        True
    """
    if part not in _LABELED_BASE:
        raise BenchError(f"demo part must be 'train' or 'test', got {part!r}")
    if not 0 <= index < _LABELED_BASE["train"]:
        raise BenchError(f"demo labeled index must be in 0..{_LABELED_BASE['train'] - 1}, got {index}")
    return _LABELED_BASE[part] + int(index)


class UnlabeledImages(Sequence[np.ndarray]):
    """A lazy sequence of demo images for pretraining; image ``i`` is ``render(start + i)``.

    Example:
        >>> images = unlabeled_images(10**9)
        >>> len(images), images[5].shape, bool((images[-1] == images[10**9 - 1]).all())
        (1000000000, (64, 64, 3), True)
    """

    def __init__(self, count: int, start: int = 0, size: int = 64) -> None:
        if count < 0 or start < 0 or start + count > _UNLABELED_LIMIT:
            raise BenchError(f"unlabeled demo seeds must lie in [0, {_UNLABELED_LIMIT}) (above are the labeled "
                             f"ones); got start={start} count={count}")
        self.count, self.start, self.size = count, start, size

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> "UnlabeledImages": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            first, stop, step = index.indices(self.count)
            if step != 1:
                raise BenchError(f"unlabeled demo images support contiguous slices only, got step {step}")
            return UnlabeledImages(max(0, stop - first), self.start + first, self.size)
        i = int(index)
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"unlabeled image index {index} out of range for {self.count} images")
        return render(self.start + i, self.size)[0]


def unlabeled_images(count: int, start: int = 0) -> Sequence[np.ndarray]:
    """``count`` unlabeled 64x64 demo images (lazy: each is drawn on access), for DDPM pretraining.

    Example:
        >>> len(unlabeled_images(1000)), unlabeled_images(3)[0].dtype
        (1000, dtype('uint8'))
    """
    return UnlabeledImages(count, start)


def _manifest(n_train: int, n_test: int, size: int) -> dict:
    return {"generator": "bench.demo", "version": GENERATOR_VERSION, "train": n_train, "test": n_test, "size": size}


def is_materialised(root: Path, *, n_train: int = 20, n_test: int = 20, size: int = 64) -> bool:
    """True when ``root`` holds a complete demo dataset of this generator version and these sizes.

    Example:
        >>> is_materialised(Path("/nonexistent"))
        False
    """
    try:
        return json.loads((Path(root) / "generator.json").read_text()) == _manifest(n_train, n_test, size)
    except (OSError, ValueError):
        return False


def materialise(root: Path, *, n_train: int = 20, n_test: int = 20, size: int = 64) -> Path:
    """Write the labeled demo set under ``root``: ``real/{train,test}/0000.png`` + ``0000.npy`` (uint8 ids).

    Atomic: drawn into a temporary folder next to ``root``, then moved into place with ``os.replace``;
    an up-to-date ``root`` is left as is, one from another generator version is replaced.

    Example:
        >>> import tempfile
        >>> root = materialise(Path(tempfile.mkdtemp()) / "demo", n_train=2, n_test=1)
        >>> sorted(p.name for p in (root / "real" / "train").iterdir())
        ['0000.npy', '0000.png', '0001.npy', '0001.png']
    """
    from PIL import Image

    root = Path(root)
    if is_materialised(root, n_train=n_train, n_test=n_test, size=size):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for part, count in (("train", n_train), ("test", n_test)):
            folder = tmp / "real" / part
            folder.mkdir(parents=True)
            for i in range(count):
                image, label = render(labeled_seed(part, i), size)
                Image.fromarray(image).save(folder / f"{i:04d}.png")
                np.save(folder / f"{i:04d}.npy", label)
        # The manifest is written last: its presence marks a complete folder.
        (tmp / "generator.json").write_text(json.dumps(_manifest(n_train, n_test, size)))
        _swap_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _swap_into_place(tmp: Path, root: Path) -> None:
    if root.exists():
        if is_materialised(root, **_sizes(tmp)):
            return  # another process finished first with the same content
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(root, old)  # move the stale folder aside, then drop it once the new one is in place
        try:
            os.replace(tmp, root)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, root)
    except OSError:
        if not is_materialised(root, **_sizes(tmp)):  # lost a race to a concurrent writer: fine if complete
            raise


def _sizes(folder: Path) -> dict:
    manifest = json.loads((folder / "generator.json").read_text())
    return {"n_train": manifest["train"], "n_test": manifest["test"], "size": manifest["size"]}


def colourise(label: np.ndarray) -> np.ndarray:
    """Label ids -> uint8 RGB for viewing (ids >= NUM_CLASSES are grey).

    Example:
        >>> colourise(np.array([[0, 255]], dtype=np.uint8)).shape
        (1, 2, 3)
    """
    out = np.full((*label.shape, 3), 128, dtype=np.uint8)
    known = label < NUM_CLASSES
    out[known] = _LABEL_COLOURS[label[known]]
    return out


def save_preview(path: Path, n: int = 8, *, part: str = "train", scale: int = 3) -> Path:
    """Save a PNG grid: ``n`` labeled scenes of ``part`` on top, their colourised labels below.

    Example:
        >>> import tempfile
        >>> save_preview(Path(tempfile.mkdtemp()) / "preview.png", n=2).suffix
        '.png'
    """
    from PIL import Image

    pairs = [render(labeled_seed(part, i)) for i in range(n)]
    top = np.concatenate([image for image, _ in pairs], axis=1)
    bottom = np.concatenate([colourise(label) for _, label in pairs], axis=1)
    grid = np.concatenate([top, bottom], axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
