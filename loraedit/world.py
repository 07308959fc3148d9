"""A procedural video world with ground-truth edits.

Every clip is a pure function of a seed: a textured background (optionally panning slowly), an
unedited distractor object, and one main object (a shape with a two-sided, textured appearance)
that moves, rotates in the image plane, squashes and stretches, and *turns* about its vertical
axis so that its back face shows part-way through the clip. Because the scene is procedural the
same clip can be rendered with the main object recoloured (front and back faces get new colours,
optionally new textures): the **true edited video**, and so the true edited frame at any time.

    clip = make_clip(seed=3)          # WorldClip: source, truth, region, alpha, captions, …
    clip.source[0]                    # (H, W, 3) uint8 first frame
    clip.truth[0]                     # the edited first frame (what a person would paint)
    clip.truth[clip.reference_frame]  # an edited later frame showing the back face

Guarantees (tested): the same seed gives the same pixels; `truth` differs from `source` only
where `region` is True (the main object's visible pixels, anti-aliased edge included); the main
object is drawn last, so nothing occludes it.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ellipse")
TEXTURES = ("stripes", "dots", "rings", "gradient", "checker")
COLOUR_NAMES = {  # hue (degrees) → a word the toy tokenizer knows
    0: "red", 30: "orange", 55: "yellow", 120: "green", 200: "blue", 270: "purple", 320: "pink", 360: "red",
}
SHAPE_WORDS = {"circle": "circle", "square": "square", "triangle": "shape", "star": "shape", "ellipse": "ball"}
SUPERSAMPLE = 3  # sub-pixel samples per axis for the objects' anti-aliased edges


def colour_name(rgb) -> str:
    r, g, b = (float(c) for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if v < 0.25:
        return "black"
    if s < 0.2:
        return "white" if v > 0.75 else "gray"
    hue = h * 360.0
    return COLOUR_NAMES[min(COLOUR_NAMES, key=lambda k: abs(k - hue))]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _triangle_wave(x: float, lo: float, hi: float) -> float:
    """Position bouncing between lo and hi: x moves freely, the result reflects at the walls."""
    span = hi - lo
    if span <= 0:
        return lo
    y = (x - lo) % (2 * span)
    return lo + (y if y <= span else 2 * span - y)


# ---------------------------------------------------------------- appearance


@dataclass
class Face:
    colour: np.ndarray  # (3,) float in [0, 1]
    texture: str
    freq: float  # texture cycles across the shape's unit half-width
    phase: float
    contrast: float

    def shade(self, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
        """Colour at local coordinates (unit shape); returns (..., 3) float."""
        f, p = self.freq, self.phase
        if self.texture == "stripes":
            t = np.sin(math.pi * f * qx + p)
        elif self.texture == "dots":
            t = np.sin(math.pi * f * qx + p) * np.sin(math.pi * f * qy + p)
        elif self.texture == "rings":
            t = np.sin(math.pi * f * np.sqrt(qx * qx + qy * qy) * 1.5 + p)
        elif self.texture == "gradient":
            t = np.clip(qx * math.cos(p) + qy * math.sin(p), -1, 1)
        else:  # checker, soft
            t = np.tanh(3 * np.sin(math.pi * f * qx * 0.8 + p) * np.sin(math.pi * f * qy * 0.8))
        return np.clip(self.colour * (1.0 + self.contrast * t)[..., None], 0, 1)


def _random_face(rng: np.random.Generator, hue: float | None = None, texture: str | None = None) -> Face:
    hue = rng.uniform() if hue is None else hue
    return Face(
        colour=_hsv(hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 0.95)),
        texture=texture or str(rng.choice(TEXTURES)),
        freq=float(rng.uniform(1.2, 2.2)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        contrast=float(rng.uniform(0.18, 0.32)),
    )


def _inside(shape: str, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    if shape in ("circle", "ellipse"):
        return qx * qx + qy * qy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(qx), np.abs(qy)) <= 0.85
    if shape == "triangle":  # apex up, unit circumradius
        return (qy <= 0.5) & (qy >= 2 * np.abs(qx) * math.sqrt(3) / 2 * 1.15 - 1.0)
    # star: five soft points
    r = np.sqrt(qx * qx + qy * qy)
    a = np.arctan2(qy, qx)
    return r <= 0.72 + 0.28 * np.cos(5 * a)


# ---------------------------------------------------------------- moving objects


@dataclass
class Body:
    shape: str
    front: Face
    back: Face
    size: float  # half-width in pixels
    aspect: float  # height / width of the unit shape
    pos0: tuple[float, float]
    vel: tuple[float, float]  # pixels per frame
    theta0: float  # in-plane rotation (radians)
    omega: float  # radians per frame
    phi0: float  # turn about the vertical axis: cos(phi) > 0 shows the front face
    spin: float  # radians per frame
    wobble: float  # squash-and-stretch amplitude
    wobble_period: float
    wobble_phase: float

    def state(self, t: float, width: int, height: int):
        m = self.size * 1.15
        cx = _triangle_wave(self.pos0[0] + self.vel[0] * t, m, width - m)
        cy = _triangle_wave(self.pos0[1] + self.vel[1] * t, m, height - m)
        theta = self.theta0 + self.omega * t
        phi = self.phi0 + self.spin * t
        squash = 1.0 + self.wobble * math.sin(2 * math.pi * t / self.wobble_period + self.wobble_phase)
        c = math.cos(phi)
        sx = self.size * max(abs(c), 0.12) / math.sqrt(squash)
        sy = self.size * self.aspect * math.sqrt(squash)
        return cx, cy, theta, sx, sy, c >= 0

    def draw(self, t: float, width: int, height: int, edit: tuple[Face, Face] | None = None):
        """Colour (H, W, 3) and coverage alpha (H, W) of the body at time t."""
        cx, cy, theta, sx, sy, front = self.state(t, width, height)
        # only the object's bounding box is rasterised (the unit shapes fit in radius 1)
        r = 1.05 * max(sx, sy) + 2
        x0, x1 = max(0, int(cx - r)), min(width, int(cx + r) + 2)
        y0, y1 = max(0, int(cy - r)), min(height, int(cy + r) + 2)
        colour = np.zeros((height, width, 3), np.float32)
        alpha = np.zeros((height, width), np.float32)
        if x1 <= x0 or y1 <= y0:
            return colour, alpha
        bw, bh = x1 - x0, y1 - y0
        k = SUPERSAMPLE
        off = (np.arange(k) + 0.5) / k - 0.5
        ys = (np.arange(y0, y1)[:, None] + off[None]).reshape(-1)  # (bh*k,)
        xs = (np.arange(x0, x1)[:, None] + off[None]).reshape(-1)
        X, Y = np.meshgrid(xs - cx, ys - cy, indexing="xy")
        ct, st = math.cos(theta), math.sin(theta)
        qx = (ct * X + st * Y) / sx
        qy = (-st * X + ct * Y) / sy
        inside = _inside(self.shape, qx, qy)
        faces = edit if edit is not None else (self.front, self.back)
        face = faces[0] if front else faces[1]
        # texture in the face's own coordinates: the back face is seen mirrored
        col = face.shade(qx if front else -qx, qy) * inside[..., None]
        col = col.reshape(bh, k, bw, k, 3).mean(axis=(1, 3))
        a = inside.reshape(bh, k, bw, k).mean(axis=(1, 3)).astype(np.float32)
        # premultiplied colour → straight colour where covered
        safe = np.where(a > 0, a, 1.0)[..., None]
        colour[y0:y1, x0:x1] = col / safe
        alpha[y0:y1, x0:x1] = a
        return colour, alpha


def _random_body(rng: np.random.Generator, width: int, height: int, frames: int, main: bool, turn: bool) -> Body:
    size = rng.uniform(0.14, 0.2) * min(width, height) if main else rng.uniform(0.07, 0.11) * min(width, height)
    speed = rng.uniform(0.9, 2.2) if main else rng.uniform(0.6, 1.6)
    ang = rng.uniform(0, 2 * math.pi)
    span = max(frames - 1, 1)
    if main and turn:
        spin = rng.choice([-1, 1]) * math.pi * rng.uniform(0.85, 1.15) / span  # front → back over the clip
        phi0 = rng.uniform(-0.25, 0.25)
    else:
        spin, phi0 = 0.0, 0.0
    hue = rng.uniform()
    front = _random_face(rng, hue)
    back = _random_face(rng, hue + rng.uniform(0.25, 0.75))
    shape = str(rng.choice(SHAPES))
    return Body(
        shape=shape, front=front, back=back, size=size,
        aspect=float(rng.uniform(0.6, 0.8)) if shape == "ellipse" else 1.0,
        pos0=(rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height),
        vel=(speed * math.cos(ang), speed * math.sin(ang)),
        theta0=float(rng.uniform(0, 2 * math.pi)), omega=float(rng.uniform(-0.06, 0.06)),
        phi0=float(phi0), spin=float(spin),
        wobble=float(rng.uniform(0.05, 0.18)), wobble_period=float(rng.uniform(6, 14)),
        wobble_phase=float(rng.uniform(0, 2 * math.pi)),
    )


# ---------------------------------------------------------------- background


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    g = rng.uniform(-1, 1, size=(cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(g, (w + w // cells * 3, h + h // cells * 3), interpolation=cv2.INTER_CUBIC)
    return big[:h, :w]


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, dict]:
    hue = rng.uniform()
    a = _hsv(hue, rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.75))
    b = _hsv(hue + rng.uniform(0.1, 0.4), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.75))
    n = _smooth_noise(rng, h, w, int(rng.integers(2, 5)))
    mix = np.clip(0.5 + 0.6 * n, 0, 1)[..., None]
    img = a * (1 - mix) + b * mix
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.choice(["stripes", "checker", "waves", "plain"])
    period = rng.uniform(18, 34)
    ang = rng.uniform(0, math.pi)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    if kind == "stripes":
        pat = np.sin(2 * math.pi * u / period)
    elif kind == "checker":
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        pat = np.tanh(2 * np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period))
    elif kind == "waves":
        pat = np.sin(2 * math.pi * u / period + 2.5 * _smooth_noise(rng, h, w, 3))
    else:
        pat = np.zeros_like(u)
    img = img * (1 + rng.uniform(0.06, 0.16) * pat[..., None])
    # a few static props: soft rectangles and discs
    for _ in range(int(rng.integers(2, 5))):
        col = _hsv(rng.uniform(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(6, 20), rng.uniform(6, 20)
        if rng.uniform() < 0.5:
            d = np.maximum(np.abs(xx - cx) / rx, np.abs(yy - cy) / ry)
        else:
            d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        m = np.clip((1.0 - d) * 4, 0, 1)[..., None]
        img = img * (1 - m) + col * m
    return np.clip(img, 0, 1).astype(np.float32), {"colour": colour_name(a), "kind": str(kind)}


# ---------------------------------------------------------------- scenes and clips


@dataclass
class WorldClip:
    seed: int
    source: np.ndarray  # (F, H, W, 3) uint8
    truth: np.ndarray  # (F, H, W, 3) uint8: the main object recoloured / retextured
    region: np.ndarray  # (F, H, W) bool: where the main object covers any part of a pixel
    alpha: np.ndarray  # (F, H, W) float32 coverage of the main object
    front_visible: np.ndarray  # (F,) bool
    caption: str
    edited_caption: str
    reference_frame: int  # the frame showing most of the back face (the natural stage-2 reference)
    fps: float = 8.0
    info: dict = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return self.source.shape[0]


class Scene:
    """One procedural scene; `frame(t)` renders it at any (fractional) time."""

    def __init__(self, seed: int, width: int = 128, height: int = 128, frames: int = 17, pan: bool | None = None,
                 distractor: bool | None = None, turn: bool = True, retexture: bool = False):
        rng = np.random.default_rng(seed)
        self.seed, self.width, self.height, self.frames = seed, width, height, frames
        pan = bool(rng.uniform() < 0.5) if pan is None else pan
        distractor = bool(rng.uniform() < 0.7) if distractor is None else distractor
        margin = 24
        self.bg, self.bg_info = _background(rng, height + 2 * margin, width + 2 * margin)
        self.margin = margin
        if pan:
            a = rng.uniform(0, 2 * math.pi)
            s = rng.uniform(0.3, 0.9)
            self.pan = (s * math.cos(a), s * math.sin(a))
        else:
            self.pan = (0.0, 0.0)
        self.main = _random_body(rng, width, height, frames, main=True, turn=turn)
        self.distractor = _random_body(rng, width, height, frames, main=False, turn=False) if distractor else None
        # the edit: new colours for both faces (hue moved well away), same or new textures
        shift = rng.uniform(0.3, 0.7)
        hue_f = colorsys.rgb_to_hsv(*self.main.front.colour)[0] + shift
        hue_b = colorsys.rgb_to_hsv(*self.main.back.colour)[0] + rng.uniform(0.3, 0.7)
        ef = _random_face(rng, hue_f, None if retexture else self.main.front.texture)
        eb = _random_face(rng, hue_b, None if retexture else self.main.back.texture)
        if not retexture:  # recolour only: keep the pattern exactly
            ef.freq, ef.phase, ef.contrast = self.main.front.freq, self.main.front.phase, self.main.front.contrast
            eb.freq, eb.phase, eb.contrast = self.main.back.freq, self.main.back.phase, self.main.back.contrast
        self.edit = (ef, eb)

    def background(self, t: float) -> np.ndarray:
        m = self.margin
        dx = max(-m, min(m, self.pan[0] * t))
        dy = max(-m, min(m, self.pan[1] * t))
        M = np.float32([[1, 0, -(m + dx)], [0, 1, -(m + dy)]])
        return cv2.warpAffine(self.bg, M, (self.width, self.height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT)

    def frame(self, t: float, edited: bool = False, faces: tuple[Face, Face] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 frame at time t and the main object's coverage alpha (H, W); `faces` (front, back)
        paints the main object with other faces than the source's or the edit's."""
        img = self.background(t)
        if self.distractor is not None:
            col, a = self.distractor.draw(t, self.width, self.height)
            img = img * (1 - a[..., None]) + col * a[..., None]
        if faces is None:
            faces = self.edit if edited else None
        col, a = self.main.draw(t, self.width, self.height, edit=faces)
        img = img * (1 - a[..., None]) + col * a[..., None]
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), a

    def captions(self) -> tuple[str, str]:
        word = SHAPE_WORDS[self.main.shape]
        bg = self.bg_info["colour"]
        return (f"a {colour_name(self.main.front.colour)} {word} moving on a {bg} background",
                f"a {colour_name(self.edit[0].colour)} {word} moving on a {bg} background")

    def clip(self, fps: float = 8.0) -> WorldClip:
        src, tru, alp = [], [], []
        for i in range(self.frames):
            s, a = self.frame(float(i))
            e, _ = self.frame(float(i), edited=True)
            src.append(s), tru.append(e), alp.append(a)
        alpha = np.stack(alp)
        # the edit only touches the object's covered pixels, so clean the (rare) equal-colour pixels too
        region = alpha > 0
        front = np.array([self.main.state(float(i), self.width, self.height)[5] for i in range(self.frames)])
        back_amount = [(-math.cos(self.main.phi0 + self.main.spin * i)) * alpha[i].sum() for i in range(self.frames)]
        ref = int(np.argmax(back_amount)) if self.frames > 1 else 0
        if ref == 0 and self.frames > 1:
            ref = self.frames - 1
        cap, ecap = self.captions()
        return WorldClip(seed=self.seed, source=np.stack(src), truth=np.stack(tru), region=region, alpha=alpha,
                         front_visible=front, caption=cap, edited_caption=ecap, reference_frame=ref, fps=fps,
                         info={"shape": self.main.shape, "pan": self.pan, "background": self.bg_info,
                               "distractor": self.distractor is not None,
                               "front_texture": self.main.front.texture, "back_texture": self.main.back.texture})


def make_clip(seed: int, frames: int = 17, width: int = 128, height: int = 128, **kwargs) -> WorldClip:
    """Render one clip (source, truth, region) deterministically from `seed`."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if width % 16 or height % 16:
        raise ValueError("width and height must be multiples of 16")
    return Scene(seed, width=width, height=height, frames=frames, **kwargs).clip()


def first_frame_bound(seed: int, frames: int = 17, width: int = 128, height: int = 128, edited: bool = True,
                      **kwargs) -> np.ndarray:
    """(F, H, W, 3) uint8: the best video any model can make from the first frame alone.

    The exact motion, with the object's back face painted as its front face: frame 0 shows only the
    front, so the back face's colour (a hue 0.25–0.75 away) cannot be known without a later frame
    (a reference). Scored by `clip_metrics` against the truth it bounds every variant without a
    reference; `edited=False` gives the bound for the source video.
    """
    scene = Scene(seed, width=width, height=height, frames=frames, **kwargs)
    front = scene.edit[0] if edited else scene.main.front
    return np.stack([scene.frame(float(i), faces=(front, front))[0] for i in range(frames)])


def write_clip(clip: WorldClip, folder: str | Path) -> dict[str, Path]:
    """Write a clip as the files a person would hand to `loraedit edit`.

    source.mp4, truth.mp4 (H.264, to watch), source.mkv / truth.mkv (lossless, to edit and measure),
    first_frame_edited.png, reference_{k:03d}.png (the true edited frame k) and mask/000.png …
    (white = the object's true region; a folder of PNG frames is what `--mask` accepts).
    """
    from loraedit.video import write_png, write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "source": folder / "source.mp4", "truth": folder / "truth.mp4",
        "source_lossless": folder / "source.mkv", "truth_lossless": folder / "truth.mkv",
        "first_frame": folder / "first_frame_edited.png",
        "reference": folder / f"reference_{clip.reference_frame:03d}.png",
        "mask": folder / "mask",
    }
    write_video(paths["source"], clip.source, clip.fps)
    write_video(paths["truth"], clip.truth, clip.fps)
    write_video(paths["source_lossless"], clip.source, clip.fps, lossless=True)
    write_video(paths["truth_lossless"], clip.truth, clip.fps, lossless=True)
    write_png(paths["first_frame"], clip.truth[0])
    write_png(paths["reference"], clip.truth[clip.reference_frame])
    for i, r in enumerate(clip.region):
        write_png(paths["mask"] / f"{i:03d}.png", (r.astype(np.uint8) * 255))
    return paths


# ---------------------------------------------------------------- metrics against the truth


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images over the pixels where `where` is True (all if None)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if where is not None:
        w = where.astype(bool)
        if not w.any():
            return float("nan")
        d = d[w]
    mse = float(d.mean())
    return 99.0 if mse < 1e-10 else 10 * math.log10(255.0 ** 2 / mse)


def through_vae(vae, video: np.ndarray) -> np.ndarray:
    """A video (F, H, W, 3) uint8 encoded (distribution mode) and decoded by a Wan VAE, as uint8: what
    the model can reproduce at best, the ceiling for any result that comes out of its decoder."""
    import torch

    p = next(vae.parameters())
    x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].to(p.device, torch.float32) / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(p.dtype)).latent_dist.mode()).sample[0].float()
    return ((rec.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def clip_metrics(result: np.ndarray, clip: WorldClip) -> dict[str, float]:
    """Compare a result video (F, H, W, 3) uint8 with the world's true edited video.

    psnr_in / colour_err_in: inside the true region (all frames but 0, pixels with coverage ≥ 0.5);
    colour_err_in is the distance in RGB (0–255) between the mean colours of result and truth in the
    region, averaged over frames; psnr_out: outside the region; first_psnr: frame 0 vs. the edited
    first frame; temporal_err: mean |Δresult - Δtruth| over consecutive frames (0–255; lower = motion
    as steady as the truth's); psnr_back: inside the region on frames showing the back face.
    colour_err_front / colour_err_back / psnr_front split the object's frames by the face they show:
    the front face is what the first frame determines, the back face only a reference frame shows.
    """
    F = min(len(result), clip.frames)
    res, tru = result[:F], clip.truth[:F]
    core = clip.alpha[:F] >= 0.5
    out = ~clip.region[:F]
    later = slice(1, F)
    errs, front_errs, back_errs = [], [], []
    for i in range(1, F):
        if core[i].sum() >= 4:
            e = float(np.linalg.norm(res[i][core[i]].mean(0).astype(np.float64)
                                     - tru[i][core[i]].mean(0).astype(np.float64)))
            errs.append(e)
            (front_errs if clip.front_visible[i] else back_errs).append(e)
    back = np.zeros(F, bool)
    back[1:] = ~clip.front_visible[1:F]
    mask_back = core & back[:, None, None]
    front = np.zeros(F, bool)
    front[1:] = clip.front_visible[1:F]
    mask_front = core & front[:, None, None]
    dr = np.diff(res.astype(np.float64), axis=0)
    dt = np.diff(tru.astype(np.float64), axis=0)
    return {
        "psnr_in": psnr(res[later], tru[later], core[later]),
        "colour_err_in": float(np.mean(errs)) if errs else float("nan"),
        "psnr_out": psnr(res[later], tru[later], out[later]),
        "first_psnr": psnr(res[0], tru[0]),
        "temporal_err": float(np.abs(dr - dt).mean()) if F > 1 else 0.0,
        "psnr_back": psnr(res, tru, mask_back) if mask_back.any() else float("nan"),
        "psnr_front": psnr(res, tru, mask_front) if mask_front.any() else float("nan"),
        "colour_err_front": float(np.mean(front_errs)) if front_errs else float("nan"),
        "colour_err_back": float(np.mean(back_errs)) if back_errs else float("nan"),
    }
