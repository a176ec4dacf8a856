"""MT-Diffusion: multi-task diffusion with forward aggregation (Chen et al., ICLR 2024).

Notation (paper §2.2.2, Theorem 2, Appendix B) with ``N`` modalities ``x_i`` and encoders ``E_i`` that
map them into the diffusion space (same shape as the latent ``z``)::

    forward step   q(z_t | z_{t-1}, X) = N( √α_t (z_{t-1} + Σ_i w_t^(i) E_i(x_i)),  (1-α_t) I )
    marginal       q(z_t | z_0, X)     = N( √ᾱ_t z_0 + Σ_i ᾱ̃_t^(i) E_i(x_i),      (1-ᾱ_t) I )
    aggregation    ᾱ̃_t^(i) = √α_t (w_t^(i) + ᾱ̃_{t-1}^(i)),  ᾱ̃ before the first step = 0
    posterior      q(z_{t-1} | z_t, z_0, X) = N( μ̃_t, β̃_t I ),   β̃_t = (1-ᾱ_{t-1})(1-α_t)/(1-ᾱ_t)
                   μ̃_t = [ √α_t(1-ᾱ_{t-1}) z_t + (1-α_t)√ᾱ_{t-1} z_0
                           + Σ_i ((1-α_t) ᾱ̃_{t-1}^(i) - α_t(1-ᾱ_{t-1}) w_t^(i)) E_i(x_i) ] / (1-ᾱ_t)
                       = 1/√α_t (z_t - (1-α_t)/√(1-ᾱ_t) ε) - Σ_i w_t^(i) E_i(x_i)        (ε form)
    loss (Eq. 6)   L = ‖ε_θ(z_t, t) - ε‖² + λ Σ_i KL(q_i(x_i) ‖ p_θ(x_i | z_t)),  λ = 0.1
                   (MSE for continuous modalities, cross-entropy for labels)

Index convention: as everywhere in :mod:`jointcore`, timesteps are ``t = 0 … T-1`` and ``ᾱ[t] = ∏_{s≤t} α_s``
(diffusers). The clean latent is "before" ``t = 0``: the paper's ``t`` is our ``t-1``, its ``ᾱ̃_0 = 0``
is our index ``-1``. Wherever a *previous* timestep ``s`` may be ``-1`` it means the clean sample
(``ᾱ_{-1} = 1``, ``ᾱ̃_{-1} = 0``).

The posterior is implemented for a general jump ``t → s`` (``s < t``), which makes strided (fewer-step)
ancestral sampling possible; with ``s = t-1`` it is exactly the paper's Appendix B.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoiser import Denoiser
from . import prediction as P

Embeddings = Sequence[Optional[torch.Tensor]]
LAMBDA_DEFAULT = 0.1
MODALITY_KINDS = ("continuous", "label")


# ---- forward aggregation -------------------------------------------------------------------------------


def alphas_from_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-step ``α_t = ᾱ_t / ᾱ_{t-1}`` (float64, ``[T]``)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return torch.cat([ab[:1], ab[1:] / ab[:-1]])


def _weights_table(weights: Union[float, Sequence[float], torch.Tensor], T: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim == 0:
        w = w.reshape(1)
    if w.ndim == 1:
        w = w[:, None].expand(-1, T)
    if w.ndim != 2 or w.shape[1] != T:
        raise ValueError(f"modality weights must be a scalar, [N] (constant in t) or [N, T={T}]; "
                         f"got shape {tuple(torch.as_tensor(weights).shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("modality weights must be finite")
    return w.contiguous()


def aggregation_coefficients(alphas_cumprod: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The recursion ``ᾱ̃_t^(i) = √α_t (w_t^(i) + ᾱ̃_{t-1}^(i))`` with zero start.

    Args:
        alphas_cumprod: ``[T]`` ᾱ.
        weights: ``[N, T]`` modality weights ``w_t^(i)``.

    Returns:
        ``[N, T]`` float64 ``ᾱ̃``.
    """
    a = alphas_from_cumprod(alphas_cumprod).sqrt()
    out = torch.zeros_like(weights, dtype=torch.float64)
    prev = torch.zeros(weights.shape[0], dtype=torch.float64)
    for t in range(weights.shape[1]):
        prev = a[t] * (weights[:, t] + prev)
        out[:, t] = prev
    return out


def _check_embeddings(embeddings: Embeddings, n: int, like: torch.Tensor, name: str = "embeddings") -> None:
    if len(embeddings) != n:
        raise ValueError(f"{name}: expected one entry per modality ({n}), got {len(embeddings)}")
    for i, e in enumerate(embeddings):
        if e is None:
            continue
        if e.shape != like.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(e.shape)}, but the encoder output E_i(x_i) must "
                             f"have the latent's shape {tuple(like.shape)}")


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[t]`` (``t`` may be -1 → handled by the caller) and shape it ``[B,1,1,1]``."""
    return values[t].to(device=like.device, dtype=torch.float64).reshape((-1,) + (1,) * (like.ndim - 1))


@dataclass
class ForwardAggregation:
    """The MT-Diffusion forward process for ``N`` modalities on a fixed noise schedule.

    Args:
        alphas_cumprod: ``[T]`` ᾱ of the diffusion schedule (e.g. ``denoiser.alphas_cumprod``).
        weights: modality weights ``w_t^(i)``: a scalar (one modality), ``[N]`` (constant in t) or ``[N, T]``.
    """

    alphas_cumprod: torch.Tensor
    weights: Any = 1.0
    w: torch.Tensor = field(init=False)
    agg: torch.Tensor = field(init=False)

    def __post_init__(self):
        ab = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D schedule with at least 2 timesteps")
        if not ((ab > 0) & (ab <= 1)).all() or not (ab[1:] <= ab[:-1]).all():
            raise ValueError("alphas_cumprod must be decreasing and in (0, 1] (zero terminal SNR is not supported "
                             "by the closed-form posterior: clamp ᾱ_T to a small positive value)")
        self.alphas_cumprod = ab
        self.w = _weights_table(self.weights, ab.numel())
        self.agg = aggregation_coefficients(ab, self.w)
        # padded tables: index t+1, so that t = -1 (the clean sample) gives ᾱ = 1, ᾱ̃ = 0
        self._ab_pad = torch.cat([torch.ones(1, dtype=torch.float64), ab])
        self._agg_pad = torch.cat([torch.zeros(self.w.shape[0], 1, dtype=torch.float64), self.agg], 1)
        self._alphas = alphas_from_cumprod(ab)

    # -- tables -------------------------------------------------------------------------------------
    @property
    def num_modalities(self) -> int:
        return self.w.shape[0]

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _ab(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ with ``ᾱ_{-1} = 1``."""
        return self._ab_pad[t + 1]

    def _agg(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, B]`` ᾱ̃ with ``ᾱ̃_{-1} = 0``."""
        return self._agg_pad[:, t + 1]

    def _t(self, t, batch: int, allow_clean: bool = False) -> torch.Tensor:
        t = torch.as_tensor(t).long().reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep batch {t.numel()} does not match latent batch {batch}")
        lo = -1 if allow_clean else 0
        if (t < lo).any() or (t >= self.num_timesteps).any():
            raise ValueError(f"timesteps must lie in [{lo}, {self.num_timesteps - 1}], got {t.tolist()}")
        return t

    def aggregate(self, embeddings: Embeddings, coeffs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``Σ_i coeffs[i, b] · E_i(x_i)[b]`` (``None`` embeddings count as zero), float64."""
        _check_embeddings(embeddings, self.num_modalities, like)
        out = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
        shape = (-1,) + (1,) * (like.ndim - 1)
        for i, e in enumerate(embeddings):
            if e is not None:
                out = out + coeffs[i].to(like.device).reshape(shape) * e.double()
        return out

    # -- forward process -------------------------------------------------------------------------------
    def q_sample(self, z0: torch.Tensor, embeddings: Embeddings, t, noise: torch.Tensor) -> torch.Tensor:
        """Closed-form marginal ``z_t = √ᾱ_t z0 + Σ_i ᾱ̃_t^(i) E_i(x_i) + √(1-ᾱ_t) ε`` (Theorem 2).

        Args:
            z0: ``[B, C, H, W]`` clean latent.
            embeddings: ``N`` tensors ``E_i(x_i)`` shaped like ``z0`` (``None`` = modality absent, zero).
            t: ``[B]`` or scalar integer timesteps in ``[0, T-1]``.
            noise: ``[B, C, H, W]`` standard normal ε.
        """
        if noise.shape != z0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal z0 shape {tuple(z0.shape)}")
        t = self._t(t, z0.shape[0])
        ab = self._ab(t).to(z0.device).reshape((-1,) + (1,) * (z0.ndim - 1))
        out = ab.sqrt() * z0.double() + self.aggregate(embeddings, self._agg(t), z0) + (1 - ab).sqrt() * noise.double()
        return out.to(z0.dtype)

    def q_step(self, z_prev: torch.Tensor, embeddings: Embeddings, t, noise: torch.Tensor) -> torch.Tensor:
        """One forward step ``z_t = √α_t (z_{t-1} + Σ_i w_t^(i) E_i(x_i)) + √(1-α_t) ε`` (Eq. 3)."""
        if noise.shape != z_prev.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal latent shape {tuple(z_prev.shape)}")
        t = self._t(t, z_prev.shape[0])
        alpha = self._alphas[t].to(z_prev.device)
        alpha = alpha.reshape((-1,) + (1,) * (z_prev.ndim - 1))
        mean = alpha.sqrt() * (z_prev.double() + self.aggregate(embeddings, self.w[:, t], z_prev))
        return (mean + (1 - alpha).sqrt() * noise.double()).to(z_prev.dtype)

    # -- posterior ---------------------------------------------------------------------------------------
    def _jump(self, t: torch.Tensor, s: torch.Tensor):
        """ᾱ_t, ᾱ_s, a_ts = ᾱ_t/ᾱ_s, aggregation added over the jump c_ts = ᾱ̃_t - √a_ts ᾱ̃_s."""
        if (s >= t).any():
            raise ValueError(f"previous timesteps must be smaller than the current ones (got t={t.tolist()}, "
                             f"s={s.tolist()})")
        ab_t, ab_s = self._ab(t), self._ab(s)
        a_ts = ab_t / ab_s
        c_ts = self._agg(t) - a_ts.sqrt()[None] * self._agg(s)
        return ab_t, ab_s, a_ts, c_ts

    def posterior_mean(self, z_t: torch.Tensor, z0: torch.Tensor, embeddings: Embeddings, t, s=None) -> torch.Tensor:
        """Mean of ``q(z_s | z_t, z_0, X)`` (Appendix B, Lemma 4; ``s = t-1`` by default).

        With ``a = ᾱ_t/ᾱ_s`` and ``c^(i) = ᾱ̃_t^(i) - √a ᾱ̃_s^(i)`` (for ``s = t-1``: ``a = α_t``,
        ``c = √α_t w_t``)::

            μ̃ = [ √a (1-ᾱ_s)(z_t - Σ c^(i) E_i) + (1-a)(√ᾱ_s z_0 + Σ ᾱ̃_s^(i) E_i) ] / (1-ᾱ_t)
        """
        B = z_t.shape[0]
        t = self._t(t, B)
        s = t - 1 if s is None else self._t(s, B, allow_clean=True)
        if z0.shape != z_t.shape:
            raise ValueError(f"z0 shape {tuple(z0.shape)} must equal z_t shape {tuple(z_t.shape)}")
        ab_t, ab_s, a_ts, c_ts = self._jump(t, s)
        r = lambda v: v.to(z_t.device).reshape((-1,) + (1,) * (z_t.ndim - 1))  # noqa: E731
        lik = z_t.double() - self.aggregate(embeddings, c_ts, z_t)
        prior = r(ab_s).sqrt() * z0.double() + self.aggregate(embeddings, self._agg(s), z_t)
        mean = (r(a_ts).sqrt() * r(1 - ab_s) * lik + r(1 - a_ts) * prior) / r(1 - ab_t)
        return mean.to(z_t.dtype)

    def posterior_variance(self, t, s=None) -> torch.Tensor:
        """``β̃ = (1-ᾱ_s)(1-ᾱ_t/ᾱ_s)/(1-ᾱ_t)`` (``[B]`` float64; ``s = t-1`` gives the paper's β̃_t)."""
        t = torch.as_tensor(t).long().reshape(-1)
        s = t - 1 if s is None else torch.as_tensor(s).long().reshape(-1).expand_as(t)
        ab_t, ab_s, a_ts, _ = self._jump(t, s)
        return (1 - ab_s) * (1 - a_ts) / (1 - ab_t)

    def predict_z0(self, z_t: torch.Tensor, eps: torch.Tensor, embeddings: Embeddings, t) -> torch.Tensor:
        """Invert the marginal: ``z0 = (z_t - Σ ᾱ̃_t^(i) E_i - √(1-ᾱ_t) ε) / √ᾱ_t``."""
        t = self._t(t, z_t.shape[0])
        ab = self._ab(t).to(z_t.device).reshape((-1,) + (1,) * (z_t.ndim - 1))
        z0 = (z_t.double() - self.aggregate(embeddings, self._agg(t), z_t) - (1 - ab).sqrt() * eps.double()) / ab.sqrt()
        return z0.to(z_t.dtype)

    def posterior_mean_from_eps(self, z_t: torch.Tensor, eps: torch.Tensor, embeddings: Embeddings, t,
                                s=None) -> torch.Tensor:
        """Posterior mean with ``z0`` replaced by its ε-estimate. For ``s = t-1`` this equals the paper's
        ``1/√α_t (z_t - (1-α_t)/√(1-ᾱ_t) ε) - Σ_i w_t^(i) E_i(x_i)`` (Algorithm 1, line 12)."""
        z0 = self.predict_z0(z_t, eps, embeddings, t)
        return self.posterior_mean(z_t, z0, embeddings, t, s)


# ---- loss --------------------------------------------------------------------------------------------


def modality_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``KL(q_i ‖ p_θ(x_i|z_t))`` up to constants: MSE (continuous) or cross-entropy (labels).

    For ``kind="label"``: ``pred`` are logits ``[B, K, …]``; ``target`` is either class indices
    ``[B, …]`` (int) or a probability vector ``[B, K, …]`` (float).
    """
    if kind == "continuous":
        if pred.shape != target.shape:
            raise ValueError(f"continuous modality: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "must have the same shape")
        return F.mse_loss(pred.float(), target.float())
    if kind == "label":
        if target.dtype in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            if target.shape != pred.shape[:1] + pred.shape[2:]:
                raise ValueError(f"label modality: logits {tuple(pred.shape)} need class-index targets of shape "
                                 f"{tuple(pred.shape[:1] + pred.shape[2:])}, got {tuple(target.shape)}")
            return F.cross_entropy(pred.float(), target.long())
        if target.shape != pred.shape:
            raise ValueError(f"label modality: probability targets {tuple(target.shape)} must match logits "
                             f"{tuple(pred.shape)}")
        return F.cross_entropy(pred.float(), target.float())
    raise ValueError(f"unknown modality kind {kind!r}; use one of {MODALITY_KINDS}")


def mt_diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, modality_preds: Sequence[Optional[torch.Tensor]],
                      modality_targets: Sequence[Optional[torch.Tensor]], kinds: Sequence[str],
                      lam: float = LAMBDA_DEFAULT) -> tuple[torch.Tensor, dict]:
    """Eq. 6: ``L = mean‖ε_θ - ε‖² + λ Σ_i L_i`` (modalities with a ``None`` prediction or target are skipped).

    Returns ``(loss, parts)`` with ``parts = {"eps": …, "modality_<i>": …}`` (detached floats).
    """
    if eps_pred.shape != eps.shape:
        raise ValueError(f"eps prediction {tuple(eps_pred.shape)} and noise {tuple(eps.shape)} differ in shape")
    if not (len(modality_preds) == len(modality_targets) == len(kinds)):
        raise ValueError("modality_preds, modality_targets and kinds need one entry per modality "
                         f"(got {len(modality_preds)}, {len(modality_targets)}, {len(kinds)})")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    l_eps = F.mse_loss(eps_pred.float(), eps.float())
    total, parts = l_eps, {"eps": float(l_eps.detach())}
    for i, (p, y, k) in enumerate(zip(modality_preds, modality_targets, kinds)):
        if p is None or y is None:
            continue
        li = modality_loss(p, y, k)
        parts[f"modality_{i}"] = float(li.detach())
        total = total + lam * li
    return total, parts


# ---- shared backbone + modality heads -----------------------------------------------------------------


class ConvHead(nn.Module):
    """A decoder head ``GroupNorm → SiLU → Conv3×3`` (the paper's masked-image decoder: "a normalisation
    layer and a convolution layer"), resized to ``out_size`` if given. ``[B,C,h,w] → [B,out,H,W]``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8):
        super().__init__()
        g = groups if in_channels % groups == 0 else 1
        self.norm = nn.GroupNorm(g, in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, out_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        y = self.conv(F.silu(self.norm(h)))
        if out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        return y


class ClassifierHead(nn.Module):
    """Global average pool + one linear layer (the paper's decoder from the middle block). ``[B,C,h,w] → [B,K]``."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, h: torch.Tensor, out_size=None) -> torch.Tensor:
        return self.fc(h.mean(dim=(-2, -1)))


class MTDiffusionModel(nn.Module):
    """Shared backbone ``ε_θ(z_t, t)`` + modality heads ``D_i`` reading one backbone block each.

    Implements the :class:`~jointcore.denoiser.Denoiser` protocol (``__call__(z_t, t, cond) → ε``);
    the heads' outputs of the last call are kept in :attr:`last_modalities` (list, one per head) so that a
    sampler can re-estimate missing modalities (Algorithm 1, lines 8–10).

    Args:
        backbone: a diffusers ``UNet2DConditionModel`` (called with ``encoder_hidden_states=cond``) or any
            module ``backbone(z_t, t, cond)`` returning ε (or an object with ``.sample``).
        heads: ``N`` head modules ``head(features, out_size) → x̂_i``.
        taps: per head, the dotted name of the backbone sub-module whose output feeds it
            (e.g. ``"mid_block"``, ``"up_blocks.1"``); ``""`` = the backbone's final output.
        alphas_cumprod: schedule (Denoiser protocol).
        out_sizes: per head, spatial output size (``None`` = keep the feature size; ``"latent"`` = z_t's).
    """

    prediction_type = "epsilon"

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module], taps: Sequence[str],
                 alphas_cumprod: torch.Tensor, out_sizes: Optional[Sequence[Any]] = None):
        super().__init__()
        if len(heads) != len(taps):
            raise ValueError(f"one tap per head needed: {len(heads)} heads, {len(taps)} taps")
        names = dict(backbone.named_modules())
        for tp in taps:
            if tp and tp not in names:
                raise ValueError(f"backbone has no sub-module {tp!r}; pick one of e.g. "
                                 f"{[n for n in names if n.count('.') <= 1 and n][:12]}")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.taps = list(taps)
        self.out_sizes = list(out_sizes) if out_sizes is not None else ["latent"] * len(heads)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.last_modalities: list[torch.Tensor] = []
        self._feats: dict[str, torch.Tensor] = {}
        for tp in set(t for t in self.taps if t):
            names[tp].register_forward_hook(self._hook(tp))

    def _hook(self, name: str):
        def fn(_m, _inp, out):
            self._feats[name] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    def _backbone(self, z_t, t, cond):
        from diffusers import UNet2DConditionModel
        if isinstance(self.backbone, UNet2DConditionModel):
            out = self.backbone(z_t, t, encoder_hidden_states=cond)
        else:
            out = self.backbone(z_t, t, cond)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, z_t: torch.Tensor, t, cond: Any = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(ε̂ [B,C,H,W], [x̂_i …])``."""
        t = torch.as_tensor(t, device=z_t.device).reshape(-1)
        t = t.expand(z_t.shape[0]) if t.numel() == 1 else t
        self._feats = {}
        eps = self._backbone(z_t, t, cond)
        outs = []
        for head, tp, size in zip(self.heads, self.taps, self.out_sizes):
            f = self._feats[tp] if tp else eps
            outs.append(head(f, tuple(z_t.shape[-2:]) if size == "latent" else size))
        self._feats = {}
        return eps, outs

    def predict(self, z_t: torch.Tensor, t, cond: Any = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(ε̂, [x̂_i …])`` (runs hooks like any module call)."""
        return super().__call__(z_t, t, cond)

    def __call__(self, z_t, t, cond=None):  # Denoiser protocol: returns ε only
        eps, outs = self.predict(z_t, t, cond)
        self.last_modalities = outs
        return eps


def training_loss(model: MTDiffusionModel, aggregation: ForwardAggregation, z0: torch.Tensor,
                  modalities: Sequence[torch.Tensor], encoders: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                  kinds: Sequence[str], cond: Any = None, t: Optional[torch.Tensor] = None,
                  noise: Optional[torch.Tensor] = None, lam: float = LAMBDA_DEFAULT,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """One stochastic evaluation of Eq. 6: sample ``t`` and ε, build ``z_t`` with forward aggregation, run the
    model, return ``mt_diffusion_loss``. Encoders get no gradient (Fig. 3: stop-gradient)."""
    B = z0.shape[0]
    if not (len(modalities) == len(encoders) == len(kinds) == aggregation.num_modalities):
        raise ValueError("modalities, encoders, kinds and the aggregation weights need one entry per modality")
    if t is None:
        t = torch.randint(0, aggregation.num_timesteps, (B,), generator=generator)
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator).to(z0)
    with torch.no_grad():
        emb = [enc(x) for enc, x in zip(encoders, modalities)]
    z_t = aggregation.q_sample(z0, emb, t, noise)
    eps_pred, preds = model.predict(z_t, t.to(z0.device), cond)
    return mt_diffusion_loss(eps_pred, noise, preds, modalities, kinds, lam)


# ---- inference (Algorithm 1) ---------------------------------------------------------------------------

StepHook = Callable[[int, int, torch.Tensor], torch.Tensor]
Reestimate = Callable[[int, int, torch.Tensor], Embeddings]


def mt_sample(denoiser: Denoiser, z: torch.Tensor, timesteps: Sequence[int], cond: Any,
              aggregation: ForwardAggregation, embeddings: Embeddings, *,
              reestimate: Optional[Reestimate] = None, generator: Optional[torch.Generator] = None,
              step_hook: Optional[StepHook] = None, callback=None, add_aggregation_at_start: bool = False) -> torch.Tensor:
    """Ancestral MT-Diffusion sampling (Algorithm 1) against the Denoiser interface.

    Per step ``t → s`` (the next entry of ``timesteps``, ``-1`` after the last)::

        ε = ε_θ(z_t, t)                                   (denoiser; any prediction type)
        E_i ← reestimate(i, t, z_t)[i] for missing i       (Algorithm 1, lines 9–10)
        z_s = μ̃(z_t, ε, E, t, s) + σ ξ,  σ² = β̃_{t,s},  ξ = 0 on the last step

    With all ``timesteps = T-1 … 0`` this is exactly Algorithm 1 (``s = t-1``); a strided descending subset
    uses the closed-form jump posterior.

    Args:
        z: ``[B,C,H,W]`` start (``z_T``; Algorithm 1 draws it from N(0, I)).
        embeddings: ``N`` current ``E_i(x_i)`` (known modalities fixed; missing ones initialised by the caller).
        reestimate: ``(i, t, z_t) → embeddings`` called after each denoiser evaluation; returns the full list
            (only the entries it wants to change need to differ).
        step_hook: ``(i, s, z_s) → z_s`` after each step (e.g. :class:`KnownRegionHook`).
        add_aggregation_at_start: add ``Σ ᾱ̃_T E_i`` to ``z`` first (the marginal's mean offset, which Algorithm 1
            leaves out; off by default to follow the paper).
    """
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts[:8]}…")
    if ts[0] >= aggregation.num_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {aggregation.num_timesteps - 1}]")
    if getattr(denoiser, "alphas_cumprod", None) is not None and \
            torch.as_tensor(denoiser.alphas_cumprod).numel() != aggregation.num_timesteps:
        raise ValueError("the denoiser's schedule and the aggregation's schedule have different lengths")
    emb = list(embeddings)
    _check_embeddings(emb, aggregation.num_modalities, z)
    if add_aggregation_at_start:
        tt = torch.full((z.shape[0],), ts[0], dtype=torch.long)
        z = (z.double() + aggregation.aggregate(emb, aggregation._agg(tt), z)).to(z.dtype)
    prev = ts[1:] + [-1]
    ab = aggregation.alphas_cumprod
    for i, (t, s) in enumerate(zip(ts, prev)):
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        with torch.no_grad():
            out = denoiser(z, tt, cond)
        eps = P.to_eps(out, z, tt, ab, denoiser.prediction_type)
        if reestimate is not None:
            emb = list(reestimate(i, t, z))
            _check_embeddings(emb, aggregation.num_modalities, z, "reestimate output")
        ss = torch.full((z.shape[0],), s, dtype=torch.long)
        mean = aggregation.posterior_mean_from_eps(z, eps, emb, tt.cpu(), ss)
        if s >= 0:
            std = aggregation.posterior_variance(t, s).sqrt().item()
            xi = torch.randn(z.shape, generator=generator, device=generator.device if generator else "cpu").to(z)
            z = (mean.double() + std * xi.double()).to(z.dtype)
        else:
            z = mean
        if step_hook is not None:
            z = step_hook(i, s, z)
        if callback is not None:
            callback(i, len(ts), z, None)
    return z


def head_reestimator(model: MTDiffusionModel, encoders: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                     embeddings: Embeddings, known: Sequence[bool]) -> Reestimate:
    """Algorithm 1 lines 9–10: after each model call, missing modalities ``x_i ← D_i(…)`` and
    ``E_i ← E_i(x_i)`` from :attr:`MTDiffusionModel.last_modalities`; known ones stay fixed.
    The latest estimates are kept in ``reestimate.modalities``."""
    if not (len(encoders) == len(embeddings) == len(known)):
        raise ValueError("encoders, embeddings and known need one entry per modality")
    state = list(embeddings)

    def fn(_i, _t, _z):
        outs = model.last_modalities
        if len(outs) != len(state):
            raise ValueError("the model's heads do not match the number of modalities")
        for j, k in enumerate(known):
            if not k:
                with torch.no_grad():
                    state[j] = encoders[j](outs[j])
        fn.modalities = list(outs)
        return list(state)

    fn.modalities = []
    return fn


# ---- masked-image setting ----------------------------------------------------------------------------


def random_patch_mask(batch: int, height: int, width: int, max_patches: int = 10, patch: int = 16,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random patch masks (paper App. E.2): ``m ~ Uniform{0…max_patches}`` patches, each at a random
    ``(y, x)`` in the image covering ``[y : min(y+patch, H), x : min(x+patch, W)]`` (may overlap).

    Returns ``[B, 1, H, W]`` float, **1 = masked** (pixel set to zero), 0 = kept.
    """
    if batch < 1 or height < 1 or width < 1 or patch < 1 or max_patches < 0:
        raise ValueError("batch, height, width and patch must be >= 1 and max_patches >= 0")
    m = torch.zeros(batch, 1, height, width)
    for b in range(batch):
        n = int(torch.randint(0, max_patches + 1, (1,), generator=generator))
        for _ in range(n):
            y = int(torch.randint(0, height, (1,), generator=generator))
            x = int(torch.randint(0, width, (1,), generator=generator))
            m[b, :, y:min(y + patch, height), x:min(x + patch, width)] = 1.0
    return m


def apply_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked image: zero where ``mask == 1``."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, image.shape[0]) or \
            mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask must be [B or 1, 1, H, W] matching the image {tuple(image.shape)}, "
                         f"got {tuple(mask.shape)}")
    return image * (1 - mask.to(image))


def mask_to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask (1 = masked) → latent mask: a latent cell is masked if *any* of its pixels is."""
    if factor < 1 or mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise ValueError(f"mask size {tuple(mask.shape[-2:])} is not divisible by the latent factor {factor}")
    return F.max_pool2d(mask.float(), factor) if factor > 1 else mask.float()


class KnownRegionHook:
    """Step hook re-imposing the known region (RePaint-style, with MT-Diffusion's marginal).

    After a step to ``s``: ``z_s ← m·z_s + (1-m)·q_sample(z_known, E, s, ξ)``; after the final step
    (``s = -1``) the known region is copied exactly: ``z_0 = where(m, z_0, z_known)``.

    Args:
        known: ``[B,C,H,W]`` clean latent whose unmasked region must be kept.
        mask: ``[B or 1, 1, H, W]``, **1 = to restore (masked)**, 0 = keep.
        aggregation, embeddings: the forward process the known region is noised with.
        noise: optional fixed ``[B,C,H,W]`` noise for the re-imposed region (default: fresh each step).
    """

    def __init__(self, known: torch.Tensor, mask: torch.Tensor, aggregation: ForwardAggregation,
                 embeddings: Embeddings, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None):
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != known.shape[-2:] or \
                mask.shape[0] not in (1, known.shape[0]):
            raise ValueError(f"mask must be [B or 1, 1, H, W] at the latent size {tuple(known.shape[-2:])}, "
                             f"got {tuple(mask.shape)}")
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("the restoration mask must be binary (0 = keep, 1 = restore)")
        if noise is not None and noise.shape != known.shape:
            raise ValueError("noise must have the known latent's shape")
        self.known, self.keep = known, (mask < 0.5).expand_as(known)
        self.aggregation, self.embeddings = aggregation, list(embeddings)
        self.noise, self.generator = noise, generator

    def __call__(self, i: int, s: int, z: torch.Tensor) -> torch.Tensor:
        if s < 0:
            return torch.where(self.keep, self.known.to(z.dtype), z)
        xi = self.noise if self.noise is not None else torch.randn(z.shape, generator=self.generator).to(z)
        ref = self.aggregation.q_sample(self.known, self.embeddings, s, xi)
        return torch.where(self.keep, ref.to(z.dtype), z)


def masked_restoration_sample(denoiser: Denoiser, known: torch.Tensor, mask: torch.Tensor, cond: Any,
                              aggregation: ForwardAggregation, embeddings: Embeddings,
                              timesteps: Optional[Sequence[int]] = None, *,
                              generator: Optional[torch.Generator] = None, reestimate: Optional[Reestimate] = None,
                              callback=None) -> torch.Tensor:
    """Constrained restoration (paper §4.1): inpaint the masked region, keep the unmasked one **exactly**.

    Args:
        known: ``[B,C,H,W]`` clean latent (masked region content is ignored).
        mask: ``[B or 1,1,H,W]``, 1 = restore. Use :func:`mask_to_latent` for a pixel mask.
        embeddings: ``E_i(x_i)`` of the conditioning modalities (masked image: identity encoder on
            :func:`apply_mask` output, in the latent space).
        timesteps: descending; default all ``T-1 … 0`` (Algorithm 1).
    """
    if timesteps is None:
        timesteps = list(range(aggregation.num_timesteps - 1, -1, -1))
    hook = KnownRegionHook(known, mask, aggregation, embeddings, generator=generator)
    z = torch.randn(known.shape, generator=generator).to(known)
    return mt_sample(denoiser, z, timesteps, cond, aggregation, embeddings, reestimate=reestimate,
                     generator=generator, step_hook=hook, callback=callback)
