"""Multi-reference style targets (METHOD.md, "Multi-reference style target").

For one layer and n references with Gram matrices ``G_k`` (C × C):

1. element-wise max: ``G'[i, j] = max_k G_k[i, j]``;
2. exact, rank-based histogram specification (Normative): the entries of ``G'`` are
   sorted, and the entry of rank ``r`` (0-based, of ``Q = C·C``) gets the ``r``-th
   quantile of the ``P = n·C·C`` pooled reference entries.

**Which quantile.** Nearest rank on the linear (min-to-max) scale: with the pooled
entries sorted ascending, rank ``r`` gets ``pooled[round(r·(P−1)/(Q−1))]`` where the
rounding is half-up and done in exact integer arithmetic, ``(2r(P−1) + Q−1) // (2(Q−1))``.
So the smallest entry gets the pooled minimum, the largest the pooled maximum, every
output value is one of the pooled reference values (no interpolation), and with a single
reference (P = Q) the output is exactly that reference's Gram.

**Ties.** Equal entries of ``G'`` are ranked in row-major order (a stable sort). A Gram
matrix is symmetric, so its off-diagonal values come in tied pairs; the pair's two
entries receive adjacent quantiles, and the target may be very slightly asymmetric. That
does not change the optimization: since ``G(x̂)`` is symmetric,
``Σ (G − T)² = Σ (G − sym T)² + const``, so the gradient equals that of the
symmetrised target.

Everything is batched over leading dimensions (one target per tile).

**One batch's targets.** :func:`style_targets`, :func:`histogram_targets` and
:func:`content_features` run the feature network over a batch's reference and content
tiles once, in float32 under ``inference_mode``, and clone the results out of it so they
can become loss buffers (``docs/engine.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .features import CONTENT_LAYER, STYLE_LAYERS, VGGFeatures
from .losses import gram

#: Risser et al.'s histogram layers.
HISTOGRAM_LAYERS: tuple[str, ...] = ("relu1_1", "relu4_1")


def quantile_indices(q: int, p: int, device: torch.device | None = None) -> Tensor:
    """Index into ``p`` sorted pooled values for each of ``q`` ranks (see module doc)."""
    if q < 1 or p < 1:
        raise ValueError(f"need at least one value on each side, got q={q}, p={p}")
    ranks = torch.arange(q, dtype=torch.int64, device=device)
    if q == 1:
        return torch.full((1,), (p - 1) // 2, dtype=torch.int64, device=device)
    return (2 * ranks * (p - 1) + (q - 1)) // (2 * (q - 1))


def _sorted(values: Tensor) -> Tensor:
    """``values`` sorted along the last axis. On the CPU through NumPy, whose vectorised
    (AVX-512) sort is several times faster than torch's on the millions of pooled Gram
    entries of a batch of tiles; order among equal values does not matter here."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = np.sort(values.detach().numpy(), axis=-1)
        return torch.from_numpy(array)
    return torch.sort(values, dim=-1).values


def specify_histogram(values: Tensor, reference: Tensor) -> Tensor:
    """Exact rank-based histogram specification of ``values`` to ``reference``'s entries.

    ``values`` is ``(..., Q)`` and ``reference`` ``(..., P)`` with the same leading shape;
    returns ``values``' shape, each row holding the chosen quantiles of its reference
    row, placed by the (stable) rank of the corresponding entry of ``values``.
    """
    if values.shape[:-1] != reference.shape[:-1]:
        raise ValueError(
            f"leading shapes differ: {tuple(values.shape)} vs {tuple(reference.shape)}"
        )
    q, p = values.shape[-1], reference.shape[-1]
    pooled = _sorted(reference)
    chosen = pooled.index_select(-1, quantile_indices(q, p, values.device))
    order = torch.argsort(values, dim=-1, stable=True)
    return torch.empty_like(chosen).scatter_(-1, order, chosen)


def multi_reference_target(grams: Tensor) -> Tensor:
    """The mr2NST target of ``(..., n_refs, C, C)`` reference Grams -> ``(..., C, C)``.

    The element-wise max of the references' Grams, histogram-specified to their pooled
    entries (see module doc).

    Raises:
        ValueError: Grams that are not ``(..., n_refs, C, C)`` with at least one reference.
    """
    if grams.ndim < 3 or grams.shape[-1] != grams.shape[-2]:
        raise ValueError(f"expected (..., n_refs, C, C) Grams, got {tuple(grams.shape)}")
    n, c = grams.shape[-3], grams.shape[-1]
    if n < 1:
        raise ValueError("at least one reference Gram is required")
    lead = grams.shape[:-3]
    stacked = grams.amax(dim=-3).reshape(*lead, c * c)
    pooled = grams.reshape(*lead, n * c * c)
    return specify_histogram(stacked, pooled).reshape(*lead, c, c)


# -- the targets of one batch of tiles, computed once -------------------------------------


def _per_reference(
    features: VGGFeatures,
    references: Sequence[Tensor],
    layers: Sequence[str],
    reduce: Callable[[Tensor], Tensor],
) -> dict[str, list[Tensor]]:
    """``{layer: [reduce(features of reference k) for each k]}``, one reference at a time
    through the network (bounded memory), under ``inference_mode``."""
    if not references:
        raise ValueError("at least one reference is required")
    per_layer: dict[str, list[Tensor]] = {name: [] for name in layers}
    with torch.inference_mode():
        for ref in references:
            feats = features(ref, layers)
            for name in layers:
                per_layer[name].append(reduce(feats[name]))
    return per_layer


def style_targets(
    features: VGGFeatures,
    references: Sequence[Tensor],
    layers: Sequence[str] = STYLE_LAYERS,
) -> dict[str, Tensor]:
    """Per-tile multi-reference target Grams ``{layer: (B, C, C)}``, in float32.

    Targets are computed once per batch, so they are never autocast: with ``amp`` only the
    optimization's passes are reduced-precision, and the loss is the float32 one.

    Args:
        features: the feature network.
        references: ``references[k]`` is ``(B, 1, h, w)``: tile b of reference k for every
            tile b of the batch. One reference at a time goes through the network, to
            bound memory.
        layers: the style layers.

    Raises:
        ValueError: no references.
    """
    per_layer = _per_reference(features, references, layers, gram)
    with torch.inference_mode():
        targets = {
            name: multi_reference_target(torch.stack(grams, dim=1))
            for name, grams in per_layer.items()
        }
    return {name: t.clone() for name, t in targets.items()}


def histogram_targets(
    features: VGGFeatures,
    references: Sequence[Tensor],
    layers: Sequence[str] = HISTOGRAM_LAYERS,
) -> dict[str, Tensor]:
    """Per-tile sorted target activations ``{layer: (B, C, M)}`` for the histogram loss.

    Each channel's activations of tile b of every reference are pooled and sorted, and M
    evenly ranked quantiles kept (M = positions of one tile at that layer), in float32."""
    per_layer = _per_reference(features, references, layers, lambda f: f.float().flatten(2))
    with torch.inference_mode():
        out = {}
        for name, flats in per_layer.items():
            m = flats[0].shape[-1]
            pooled = torch.sort(torch.cat(flats, dim=-1), dim=-1).values
            out[name] = pooled.index_select(
                -1, quantile_indices(m, pooled.shape[-1], pooled.device)
            )
    return {name: t.clone() for name, t in out.items()}


def content_features(
    features: VGGFeatures, content: Tensor, layers: Sequence[str] = (CONTENT_LAYER,)
) -> dict[str, Tensor]:
    """Content-layer features of the content tiles, computed once in float32 (see
    :func:`style_targets`), autograd-ready."""
    with torch.inference_mode():
        feats: dict[str, Tensor] = features(content, tuple(layers))
        out = {name: feats[name].float() for name in layers}
    return {name: t.clone() for name, t in out.items()}
