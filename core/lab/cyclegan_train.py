"""Training the CycleGAN baseline (Zhu et al. 2017) on native-resolution crops.

Two generators, ``g`` (GE → UIH) and ``f`` (UIH → GE), and two PatchGAN discriminators,
``d_uih`` and ``d_ge`` (:mod:`mr2nst.core.cyclegan`). One step, as in the paper:

- generators: LSGAN adversarial terms ``(D(G(x)) − 1)²`` both ways, the cycle terms
  ``λ_cyc · |F(G(x)) − x|₁`` both ways, and the identity terms
  ``λ_id · |G(y) − y|₁`` both ways;
- discriminators: ``((D(real) − 1)² + D(fake)²) / 2``, each on fakes drawn from a pool of
  the last 50 generated crops (the paper's image buffer).

Crops are drawn by the caller; this module knows tensors only.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cyclegan import Generator, GeneratorConfig, PatchDiscriminator


@dataclass(frozen=True)
class CycleGanSettings:
    """Loss weights and optimizer settings (the paper's: λ_cyc 10, λ_id 5, Adam 2e-4, β1 .5)."""

    cycle_weight: float = 10.0
    identity_weight: float = 5.0
    lr: float = 2e-4
    beta1: float = 0.5
    pool: int = 50

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)


class FakePool:
    """The last ``size`` generated crops; each query returns, per crop, the new one or (half
    the time, once full) a stored one that it replaces."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.items: list[Tensor] = []
        self.rng = random.Random(seed)

    def query(self, fakes: Tensor) -> Tensor:
        out = []
        for fake in fakes.detach():
            if len(self.items) < self.size:
                self.items.append(fake)
                out.append(fake)
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.size)
                out.append(self.items[index])
                self.items[index] = fake
            else:
                out.append(fake)
        return torch.stack(out)


def _lsgan(logits: Tensor, real: bool) -> Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return ((logits - target) ** 2).mean()


class CycleGan(nn.Module):
    """The four networks, their optimizers and one training step."""

    def __init__(self, config: GeneratorConfig, settings: CycleGanSettings, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.g, self.f = Generator(config), Generator(config)
        self.d_uih, self.d_ge = PatchDiscriminator(), PatchDiscriminator()
        self.settings = settings
        betas = (settings.beta1, 0.999)
        generators = [*self.g.parameters(), *self.f.parameters()]
        discriminators = [*self.d_uih.parameters(), *self.d_ge.parameters()]
        self.opt_g = torch.optim.Adam(generators, lr=settings.lr, betas=betas)
        self.opt_d = torch.optim.Adam(discriminators, lr=settings.lr, betas=betas)
        self.pool_uih, self.pool_ge = (
            FakePool(settings.pool, seed),
            FakePool(settings.pool, seed + 1),
        )

    def step(self, ge: Tensor, uih: Tensor) -> dict[str, float]:
        """One update of the generators, then of the discriminators, on crops
        ``(N, 1, S, S)`` of each domain; the losses."""
        s = self.settings
        fake_uih, fake_ge = self.g(ge), self.f(uih)
        adversarial = _lsgan(self.d_uih(fake_uih), True) + _lsgan(self.d_ge(fake_ge), True)
        cycle = (self.f(fake_uih) - ge).abs().mean() + (self.g(fake_ge) - uih).abs().mean()
        identity = (self.g(uih) - uih).abs().mean() + (self.f(ge) - ge).abs().mean()
        loss_g = adversarial + s.cycle_weight * cycle + s.identity_weight * identity
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()  # type: ignore[no-untyped-call, unused-ignore]
        self.opt_g.step()

        loss_d = 0.5 * (
            _lsgan(self.d_uih(uih), True)
            + _lsgan(self.d_uih(self.pool_uih.query(fake_uih)), False)
            + _lsgan(self.d_ge(ge), True)
            + _lsgan(self.d_ge(self.pool_ge.query(fake_ge)), False)
        )
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()  # type: ignore[no-untyped-call, unused-ignore]
        self.opt_d.step()
        return {
            "adversarial": float(adversarial.detach()),
            "cycle": float(cycle.detach()),
            "identity": float(identity.detach()),
            "generators": float(loss_g.detach()),
            "discriminators": float(loss_d.detach()),
        }
