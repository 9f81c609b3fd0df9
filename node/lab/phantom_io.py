"""Write the synthetic paired phantom as MG DICOM files plus ground truth.

The phantom comes from :mod:`mr2nst.core.lab.phantom`, its DICOM datasets from
:mod:`.phantom_dicom`. Each case ``i`` is one synthetic breast drawn from the set's seed,
written once per vendor:

- ``ge/case0000.dcm``: the soft GE-like rendering, 12-bit, MONOCHROME2 by default;
- ``uih/case0000.dcm``: the sharp UIH-like rendering of the *same* breast in the same
  geometry, 14-bit, MONOCHROME1 by default: the true UIH rendering of ``ge/case0000.dcm``;
- ``truth/case0000_mask.png``: the breast mask (8-bit PNG, 255 inside);
- ``truth/case0000.json``: µC positions (row, col, diameter_px), masses (row, col,
  radius_px), view, laterality, pixel spacing, seed and the paired file names.

The defaults give the node both photometric interpretations to handle (GE sources are
MONOCHROME2, the UIH bank is MONOCHROME1); ``photometric`` and ``bits`` force one value
for every vendor. View and laterality cycle through LCC, RCC, LMLO, RMLO starting at an
offset taken from the seed, so any four consecutive cases cover all four. The same
arguments write byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmwrite

from mr2nst.core.lab.phantom import PhantomCase, PhantomSpec, make_case
from mr2nst.node.lab.phantom_dicom import (
    DEFAULT_UID_SEED,
    MG_FOR_PRESENTATION,
    PHOTOMETRICS,
    phantom_dataset,
    vendor_profile,
)

__all__ = [
    "MG_FOR_PRESENTATION",
    "case_spec",
    "phantom_dataset",
    "run_phantom_command",
    "write_phantom_set",
]

# (view, laterality) in the order cases cycle through them.
_GEOMETRIES = (("CC", "L"), ("CC", "R"), ("MLO", "L"), ("MLO", "R"))


def case_spec(index: int, *, seed: int = 0, size: tuple[int, int] = (2294, 1914)) -> PhantomSpec:
    """The spec of case ``index`` of a phantom set: its own seed, view and laterality."""
    view, laterality = _GEOMETRIES[(index + seed) % len(_GEOMETRIES)]
    case_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return PhantomSpec(
        height=size[0], width=size[1], view=view, laterality=laterality, seed=case_seed
    )


def _truth(
    case: PhantomCase, files: dict[str, str], index: int, set_seed: int
) -> dict[str, object]:
    """The ground truth of one case; ``make_case(PhantomSpec(seed=..., ...))`` redraws it."""
    spec = case.spec
    return {
        "case": index,
        "set_seed": set_seed,
        "seed": spec.seed,
        "view": spec.view,
        "laterality": spec.laterality,
        "rows": spec.height,
        "columns": spec.width,
        "pixel_spacing_mm": spec.pixel_spacing_mm,
        "calcs": [[round(float(v), 3) for v in row] for row in case.calcs],
        "masses": [[round(float(v), 3) for v in row] for row in case.masses],
        "files": files,
    }


def write_phantom_set(
    out_dir: Path,
    n: int,
    *,
    size: tuple[int, int] = (2294, 1914),
    seed: int = 0,
    vendors: Sequence[str] = ("GE", "UIH"),
    photometric: str | None = None,
    bits: int | None = None,
    j2k: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``n`` paired cases under ``out_dir``; return the DICOM files, case by case.

    ``photometric``/``bits`` of ``None`` keep each vendor's default (GE 12-bit
    MONOCHROME2, UIH 14-bit MONOCHROME1). Ground truth goes to ``out_dir/truth``.
    """
    if n < 0:
        raise ValueError(f"number of cases must be >= 0, got {n}")
    profiles = [vendor_profile(v) for v in vendors]
    if not profiles:
        raise ValueError("at least one vendor is needed")
    if photometric is not None and photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    out_dir = Path(out_dir)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    for prof in profiles:
        (out_dir / prof.key.lower()).mkdir(parents=True, exist_ok=True)
    uid_seed = f"{DEFAULT_UID_SEED}-{seed}"
    written: list[Path] = []
    for index in _progress(range(n), progress, total=n):
        case = make_case(case_spec(index, seed=seed, size=size))
        name = f"case{index:04d}"
        files: dict[str, str] = {}
        for prof in profiles:
            ds = phantom_dataset(
                case,
                prof.key,
                bits_stored=bits,
                photometric=photometric,
                j2k=j2k,
                patient_index=index,
                uid_seed=uid_seed,
            )
            path = out_dir / prof.key.lower() / f"{name}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            files[prof.key] = f"{prof.key.lower()}/{name}.dcm"
            written.append(path)
        Image.fromarray(case.mask.astype(np.uint8) * 255).save(truth_dir / f"{name}_mask.png")
        (truth_dir / f"{name}.json").write_text(
            json.dumps(_truth(case, files, index, seed), indent=1) + "\n", encoding="utf-8"
        )
    return written


def _progress(items: Iterable[int], enabled: bool, total: int) -> Iterable[int]:
    if not enabled:
        return items
    from tqdm import tqdm

    bar: Iterable[int] = tqdm(items, total=total, desc="phantom", unit="case")
    return bar


def run_phantom_command(
    out: Path,
    n: int,
    size: tuple[int, int],
    seed: int,
    vendors: tuple[str, ...],
    j2k: bool,
    photometric: str | None,
    bits: int | None,
    progress: bool,
) -> list[Path]:
    """``mr2nst phantom``: write a paired phantom set; return the DICOM files written."""
    return write_phantom_set(
        out,
        n,
        size=size,
        seed=seed,
        vendors=vendors,
        photometric=photometric,
        bits=bits,
        j2k=j2k,
        progress=progress,
    )
