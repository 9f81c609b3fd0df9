"""Synthetic paired mammograms: one breast, rendered GE-like and UIH-like.

:func:`make_case` draws a synthetic breast from a seed and renders it in two vendor
styles (see :mod:`mr2nst.core.lab.phantom_render`). The anatomy:

- a breast outline (half-ellipse with a lobulated border) whose compressed thickness
  falls off towards the skin, plus a thin skin line;
- fibroglandular tissue from power-law (1/f^beta, beta ~ 3) Gaussian noise, squashed
  through a soft threshold and concentrated behind the nipple;
- on MLO views, the pectoral muscle: a bright triangle in the upper chest-wall corner;
- a few vessels (smooth random walks from the chest wall towards the nipple);
- masses (dense blobs with an irregular margin);
- clusters of microcalcifications (µC), each 1-4 px across.

**Geometry.** Row 0 is the top of the image. A *left* breast (``laterality="L"``) has its
chest wall at column 0 and points right; a *right* breast is the exact mirror image,
with the chest wall at the last column. This is the usual display of mammograms, the
two breasts back to back. Ground-truth coordinates are pixel centres (row, col).

Sizes of anatomy scale with the image, except µCs, which are always 1-4 px across.
Everything is deterministic per ``PhantomSpec.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]

from mr2nst.core.errors import ImageError
from mr2nst.core.intensity import FloatImage
from mr2nst.core.lab.phantom_render import BoolImage, powerlaw_noise, render_ge, render_uih

__all__ = [
    "BoolImage",
    "PhantomCase",
    "PhantomSpec",
    "make_case",
    "render_ge",
    "render_uih",
]

VIEWS = ("CC", "MLO")
LATERALITIES = ("L", "R")


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw: image size, view, laterality and the seed of everything random."""

    height: int = 2294
    width: int = 1914
    view: str = "CC"  # "CC" | "MLO"
    laterality: str = "L"  # "L": chest wall at column 0; "R": chest wall at the last column
    seed: int = 0
    pixel_spacing_mm: float = 0.1
    n_masses: int = 2
    n_clusters: int = 2  # each cluster holds 4-10 µCs of 1-4 px diameter
    beta: float = 3.0  # power-law exponent of the fibroglandular texture

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ImageError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.laterality not in LATERALITIES:
            raise ImageError(f"laterality must be one of {LATERALITIES}, got {self.laterality!r}")
        if self.height < 64 or self.width < 64:
            raise ImageError(f"phantom needs at least 64x64 pixels, got {self.height}x{self.width}")
        if self.n_masses < 0 or self.n_clusters < 0:
            raise ImageError("n_masses and n_clusters must be >= 0")
        if not self.pixel_spacing_mm > 0:
            raise ImageError(f"pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic breast: its anatomy, both vendor renderings and the ground truth.

    Images are float32 in [0, 1], brighter = denser. ``calcs`` is (N, 3): row, col,
    diameter_px of each µC; ``masses`` is (M, 3): row, col, radius_px.
    """

    spec: PhantomSpec
    density: FloatImage
    ge: FloatImage
    uih: FloatImage
    mask: BoolImage
    calcs: npt.NDArray[np.float64]
    masses: npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Outline:
    """The breast region of a left-oriented image (chest wall at column 0)."""

    mask: BoolImage
    thickness: FloatImage  # 1 in the compressed interior, falling to 0 at the skin
    radius: FloatImage  # normalised elliptical radius (< 1 inside the breast)
    pectoral: FloatImage  # pectoral-muscle density factor, 0 outside it (all 0 on CC)


def _outline(h: int, w: int, view: str, gen: np.random.Generator) -> _Outline:
    """Breast mask, thickness profile and pectoral muscle, chest wall on the left."""
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    if view == "CC":
        centre_row = h * gen.uniform(0.46, 0.54)
        semi_rows = h * gen.uniform(0.36, 0.44)
        depth = w * gen.uniform(0.66, 0.8)
        tilt = gen.uniform(-0.06, 0.06)
    else:
        centre_row = h * gen.uniform(0.40, 0.46)
        semi_rows = h * gen.uniform(0.48, 0.54)
        depth = w * gen.uniform(0.7, 0.82)
        tilt = gen.uniform(0.12, 0.22)  # the nipple points slightly down on MLO
    # Rotate about the chest-wall centre so that the breast axis tilts by ``tilt`` rad.
    dr = rows - np.float32(centre_row)
    u = cols * np.float32(np.cos(tilt)) + dr * np.float32(np.sin(tilt))
    v = dr * np.float32(np.cos(tilt)) - cols * np.float32(np.sin(tilt))
    radius = np.sqrt((u / np.float32(depth)) ** 2 + (v / np.float32(semi_rows)) ** 2)
    # A lobulated border: a few low angular harmonics of the radius.
    angle = np.arctan2(v / np.float32(semi_rows), u / np.float32(depth))
    wobble = np.zeros_like(radius)
    for k in range(2, 6):
        wobble += np.float32(gen.uniform(0.0, 0.025 / k * 2)) * np.cos(
            np.float32(k) * angle + np.float32(gen.uniform(0, 2 * np.pi))
        )
    radius = np.asarray(radius * (np.float32(1.0) + wobble), dtype=np.float32)
    mask = radius < 1.0
    # Compressed thickness: flat inside r0, a semicircular fall-off to the skin.
    r0 = np.float32(gen.uniform(0.72, 0.82))
    edge = np.clip((radius - r0) / (np.float32(1.0) - r0), 0.0, 1.0)
    thickness = np.where(mask, np.sqrt(np.float32(1.0) - edge * edge), np.float32(0.0))
    pectoral = np.zeros((h, w), dtype=np.float32)
    if view == "MLO":
        # Triangle in the upper chest-wall corner: col/top_w + row/left_h < 1, soft edge.
        top_w = w * gen.uniform(0.28, 0.38)
        left_h = h * gen.uniform(0.5, 0.68)
        bulge = np.float32(gen.uniform(0.0, 0.08))  # a slightly convex muscle border
        s = cols / np.float32(top_w) + rows / np.float32(left_h)
        s = s - bulge * np.sin(np.pi * np.clip(rows / np.float32(left_h), 0, 1))
        soft = np.float32(max(0.01, 4.0 / min(top_w, left_h)))
        weight = np.clip((1.0 - s) / soft, 0.0, 1.0)
        mask = mask | (weight > 0)
        thickness = np.maximum(thickness, np.minimum(weight * 4.0, 1.0))
        # The muscle gets thicker (brighter) towards the corner.
        pectoral = np.asarray(weight * (0.88 + 0.3 * np.clip(1.0 - s, 0.0, 1.0)), np.float32)
    return _Outline(mask, np.asarray(thickness, dtype=np.float32), radius, pectoral)


def _glandular(out: _Outline, beta: float, gen: np.random.Generator) -> FloatImage:
    """Fibroglandular fraction in [0, 1]: thresholded 1/f^beta noise in a central envelope."""
    h, w = out.mask.shape
    field = powerlaw_noise((h, w), beta, gen, f_low=3.0 / max(h, w))
    fine = powerlaw_noise((h, w), 2.0, gen)  # a little fine-grained parenchymal detail
    field = field + np.float32(0.15) * fine
    centre = np.float32(gen.uniform(0.35, 0.5))
    envelope = np.exp(-(((out.radius - centre) / np.float32(0.38)) ** 2))
    level = np.float32(gen.uniform(-0.6, 0.6))  # from fatty to dense breasts
    gland = envelope / (np.float32(1.0) + np.exp(-np.float32(2.2) * (field + level)))
    return np.asarray(gland, dtype=np.float32)


def _vessels(h: int, w: int, out: _Outline, gen: np.random.Generator) -> FloatImage:
    """A few thin, slightly curved vessels from the chest wall towards the nipple."""
    scale = min(h, w)
    n = int(gen.integers(4, 8))
    step = 0.5
    all_r: list[npt.NDArray[np.float64]] = []
    all_c: list[npt.NDArray[np.float64]] = []
    for _ in range(n):
        rows_in = np.flatnonzero(out.mask[:, 1])
        if rows_in.size == 0:
            break
        r = float(gen.choice(rows_in))
        length = gen.uniform(0.3, 0.7) * w
        steps = int(length / step)
        heading = gen.uniform(-0.5, 0.5) + np.cumsum(gen.normal(0.0, 0.02, steps))
        heading += np.float64((h / 2 - r) / h * 0.6)  # converge a little towards the nipple
        all_r.append(r + np.cumsum(step * np.sin(heading)))
        all_c.append(np.cumsum(step * np.cos(heading)))
    lines = np.zeros(h * w, dtype=np.float32)
    if all_r:
        rr = np.rint(np.concatenate(all_r)).astype(np.int64)
        cc = np.rint(np.concatenate(all_c)).astype(np.int64)
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        lines = np.bincount(rr[ok] * w + cc[ok], minlength=h * w).astype(np.float32)
    sigma = max(0.8, scale * 0.0012)
    # A blurred line of `1/step` points per px peaks at (1/step) / (sqrt(2 pi) sigma).
    gain = np.float32(step * np.sqrt(2 * np.pi) * sigma)
    img = ndi.gaussian_filter(lines.reshape(h, w), sigma, mode="constant") * gain
    return np.asarray(np.clip(img, 0.0, 1.5) * out.thickness, dtype=np.float32)


def _pick_site(
    out: _Outline, gen: np.random.Generator, taken: list[tuple[float, float, float]], radius: float
) -> tuple[float, float] | None:
    """A random point well inside the breast, off the pectoral muscle, away from ``taken``."""
    h, w = out.mask.shape
    for _ in range(2000):
        r = gen.uniform(0, h - 1)
        c = gen.uniform(0, w - 1)
        ir, ic = int(round(r)), int(round(c))
        if out.radius[ir, ic] > 0.7 or out.pectoral[ir, ic] > 0 or c < 0.08 * w:
            continue
        if all((r - tr) ** 2 + (c - tc) ** 2 > (radius + tq) ** 2 for tr, tc, tq in taken):
            return r, c
    return None


def _masses(
    img: FloatImage,
    out: _Outline,
    n: int,
    gen: np.random.Generator,
    taken: list[tuple[float, float, float]],
) -> list[tuple[float, float, float]]:
    """Add ``n`` masses (irregular dense blobs) to ``img`` in place; return (row, col, radius)."""
    h, w = img.shape
    found: list[tuple[float, float, float]] = []
    for _ in range(n):
        radius = float(gen.uniform(0.02, 0.045) * min(h, w))
        site = _pick_site(out, gen, taken, radius * 1.5)
        if site is None:
            break
        r, c = site
        ext = int(np.ceil(radius * 1.4)) + 2
        r0, r1 = max(0, int(r) - ext), min(h, int(r) + ext + 1)
        c0, c1 = max(0, int(c) - ext), min(w, int(c) + ext + 1)
        dr = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(r)
        dc = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(c)
        ang = np.arctan2(dr, dc)
        edge = np.float32(radius) * (
            np.float32(1.0)
            + sum(
                np.float32(gen.uniform(0, 0.12)) * np.cos(k * ang + np.float32(gen.uniform(0, 6.3)))
                for k in (3, 5, 7)
            )
        )
        q = np.clip(1.0 - (dr * dr + dc * dc) / (edge * edge), 0.0, 1.0)
        amp = np.float32(gen.uniform(0.14, 0.24))
        img[r0:r1, c0:c1] += amp * np.sqrt(q) * out.thickness[r0:r1, c0:c1]
        found.append((r, c, radius))
        taken.append((r, c, radius))
    return found


def _calcs(
    img: FloatImage,
    out: _Outline,
    n_clusters: int,
    gen: np.random.Generator,
    taken: list[tuple[float, float, float]],
) -> list[tuple[float, float, float]]:
    """Add clusters of anti-aliased µC disks (1-4 px across) in place; return (row, col, diam)."""
    h, w = img.shape
    found: list[tuple[float, float, float]] = []
    for _ in range(n_clusters):
        spread = max(9.0, 0.012 * min(h, w))
        site = _pick_site(out, gen, taken, spread + 6)
        if site is None:
            break
        cr, cc = site
        taken.append((cr, cc, spread))
        members: list[tuple[float, float, float]] = []
        target = int(gen.integers(4, 11))
        for _ in range(target * 20):
            if len(members) >= target:
                break
            d = float(gen.uniform(1.0, 4.0))
            r = cr + gen.normal(0.0, spread / 2)
            c = cc + gen.normal(0.0, spread / 2)
            if not (4 <= r < h - 4 and 4 <= c < w - 4) or not out.mask[int(r), int(c)]:
                continue
            if any(
                (r - mr) ** 2 + (c - mc) ** 2 < ((d + md) / 2 + 5) ** 2 for mr, mc, md in members
            ):
                continue
            members.append((r, c, d))
        for r, c, d in members:
            ir, ic = int(round(r)), int(round(c))
            dr = np.arange(ir - 3, ir + 4, dtype=np.float32)[:, None] - np.float32(r)
            dc = np.arange(ic - 3, ic + 4, dtype=np.float32)[None, :] - np.float32(c)
            # Coverage of a disk of diameter d (linear anti-aliasing over one pixel).
            cover = np.clip(np.float32(d / 2 + 0.5) - np.sqrt(dr * dr + dc * dc), 0.0, 1.0)
            # The smallest µCs are denser, so that every one stays visible in both styles.
            amp = np.float32(gen.uniform(0.4, 0.6) * (1.0 + 0.6 * max(0.0, 2.0 - d)))
            img[ir - 3 : ir + 4, ic - 3 : ic + 4] += amp * cover
        found.extend(members)
    return found


def make_case(spec: PhantomSpec) -> PhantomCase:
    """Draw and render one synthetic breast (deterministic per ``spec.seed``)."""
    h, w = spec.height, spec.width
    anatomy, ge_seed, uih_seed = np.random.SeedSequence([spec.seed, 0x6D72326E]).spawn(3)
    gen = np.random.default_rng(anatomy)
    out = _outline(h, w, spec.view, gen)
    gland = _glandular(out, spec.beta, gen)
    # Attenuation: fat + glandular tissue scaled by thickness, skin, muscle, vessels.
    skin_band = np.clip((out.radius - np.float32(0.985)) / np.float32(0.015), 0.0, 1.0)
    density = out.thickness * (np.float32(0.3) + np.float32(0.42) * gland)
    density = density + np.float32(0.12) * skin_band * out.mask
    density = np.maximum(density, np.float32(0.6) * out.pectoral + np.float32(0.08) * gland)
    density = density + np.float32(0.07) * _vessels(h, w, out, gen)
    density = np.asarray(density, dtype=np.float32)
    taken: list[tuple[float, float, float]] = []
    masses = _masses(density, out, spec.n_masses, gen, taken)
    calcs = _calcs(density, out, spec.n_clusters, gen, taken)
    density = np.where(out.mask, np.clip(density, 0.0, 1.0), np.float32(0.0)).astype(np.float32)
    ge = render_ge(density, out.mask, np.random.default_rng(ge_seed))
    uih = render_uih(density, out.mask, np.random.default_rng(uih_seed))
    calc_arr = np.asarray(calcs, dtype=np.float64).reshape(-1, 3)
    mass_arr = np.asarray(masses, dtype=np.float64).reshape(-1, 3)
    mask = out.mask
    if spec.laterality == "R":
        density, ge, uih, mask = (
            np.ascontiguousarray(a[:, ::-1]) for a in (density, ge, uih, mask)
        )
        calc_arr[:, 1] = (w - 1) - calc_arr[:, 1]
        mass_arr[:, 1] = (w - 1) - mass_arr[:, 1]
    return PhantomCase(spec, density, ge, uih, mask, calc_arr, mass_arr)
