"""Panorama metrics and an offline LPIPS loader.

* :func:`load_lpips` — LPIPS (Zhang et al. 2018) with the torchvision VGG16/AlexNet backbone read from a
  local file (the ``lpips`` package would otherwise download it from download.pytorch.org at first use).
  LPIPS' own linear-layer weights ship inside the ``lpips`` pip package.
* :func:`intra_lpips` — mean pairwise LPIPS between non-overlapping crops of a panorama (SyncDiffusion /
  JointNet coherence metric; crops of the panorama height, stride = crop size by default).
* :func:`seam_score` — 360° seam continuity: mean |left column − right column| over the mean difference of
  adjacent interior columns (≈ 1 for a seamless panorama, ≫ 1 with a visible seam).
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

from ._deps import require

#: torchvision file names of the LPIPS backbones (as torchvision's model zoo / torch hub cache names them).
TORCHVISION_BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
TORCHVISION_URL = "https://download.pytorch.org/models/"


def find_lpips_backbone(net: str = "vgg", search: Iterable[str] = ()) -> Optional[str]:
    """Path of the torchvision backbone file for ``net`` in ``search`` (files or folders, searched
    recursively one level) or in the torch hub cache; None when absent."""
    fname = _backbone_file(net)
    cands = []
    for p in search:
        if not p:
            continue
        if os.path.isfile(p):
            cands.append(p)
        elif os.path.isdir(p):
            cands.append(os.path.join(p, fname))
            for sub in sorted(os.listdir(p)):
                cands.append(os.path.join(p, sub, fname))
    try:
        cands.append(os.path.join(torch.hub.get_dir(), "checkpoints", fname))
    except Exception:  # pragma: no cover - hub dir unavailable
        pass
    for c in cands:
        if os.path.isfile(c):
            return c
    return None


def _backbone_file(net: str) -> str:
    if net not in TORCHVISION_BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; use one of {sorted(TORCHVISION_BACKBONE_FILES)}")
    return TORCHVISION_BACKBONE_FILES[net]


def missing_backbone_message(net: str, where: Sequence[str] = ()) -> str:
    fname = _backbone_file(net)
    place = where[0] if where else os.path.join(torch.hub.get_dir(), "checkpoints")
    return (f"LPIPS ({net}) needs the torchvision ImageNet weights '{fname}' and they are not on this machine "
            f"(no download is attempted). Download {TORCHVISION_URL}{fname} and place it at "
            f"{os.path.join(place, fname)}" + (f" (searched: {', '.join(where)})" if where else ""))


def load_lpips_backbone_weights(model: torch.nn.Module, path: str) -> None:
    """Copy torchvision ``features.<k>.*`` weights from ``path`` into an ``lpips.LPIPS`` model's backbone."""
    from .models.preflight import unreadable_weights_reason

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - code in the pickle, truncated/corrupt file
        raise ValueError(f"LPIPS backbone file {path} {unreadable_weights_reason(e)}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"LPIPS backbone file {path} holds a {type(sd).__name__}, not torchvision weights")
    if "state_dict" in sd in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    net = model.net
    missing = []
    with torch.no_grad():
        for sl in net.children():
            for name, mod in sl.named_children():
                for pname, p in mod.named_parameters(recurse=False):
                    key = f"features.{name}.{pname}"
                    if key not in sd:
                        missing.append(key)
                        continue
                    if tuple(sd[key].shape) != tuple(p.shape):
                        raise ValueError(f"{path}: {key} has shape {tuple(sd[key].shape)}, expected {tuple(p.shape)}; "
                                         "is this the right torchvision backbone file?")
                    p.copy_(sd[key])
    if missing:
        raise ValueError(f"{path} is not a torchvision backbone checkpoint for this LPIPS net (missing "
                         f"{missing[:3]}…)")


class _ReferenceLayerTerm(torch.autograd.Function):
    """One LPIPS layer's distance of features ``f [k·B,C,h,w]`` to a fixed reference, per image:
    ``mean_hw (A/n² − 2X/n + R)`` with ``S = Σ_c f_c²``, ``n = √S + ε``, ``A = Σ_c w_c f_c²``,
    ``X = Σ_c (w r̂)_c f_c`` (``wr [B,C,h,w]``: the weights times the normalised reference, image ``i`` against
    reference ``i mod B``) and ``R = Σ_c w_c r̂_c²`` (``rr [B,h,w]``).

    Its gradient in closed form: ``∂/∂f_c = f_c (2 w_c/n² + κ) − 2 (w r̂)_c / n`` with
    ``κ = (2X/n² − 2A/n³) / √S`` (0 where ``S`` is clamped), times the upstream gradient over ``h·w``.
    """

    @staticmethod
    def forward(ctx, f, w, wr, rr):
        n_img, c, h, wd = f.shape
        B = wr.shape[0]
        k = n_img // B
        sq = f * f
        S = sq.sum(1)
        A = torch.nn.functional.conv2d(sq, w.view(1, c, 1, 1))[:, 0]  # Σ_c w f²
        del sq
        X = (f.view(k, B, c, h, wd) * wr).sum(2).view(n_img, h, wd)  # Σ_c w r̂ f
        root = S.clamp_min(1e-30).sqrt()
        inv = 1.0 / (root + 1e-10)  # lpips.normalize_tensor's 1 / (‖f‖ + eps)
        d = A * inv * inv - 2 * X * inv + rr.repeat(k, 1, 1)
        kappa = torch.where(S > 1e-30, (2 * X * inv * inv - 2 * A * inv * inv * inv) / root, torch.zeros_like(S))
        ctx.save_for_backward(f, w, wr, inv, kappa)
        return d.mean((-2, -1))

    @staticmethod
    def backward(ctx, g):
        f, w, wr, inv, kappa = ctx.saved_tensors
        n_img, c, h, wd = f.shape
        B = wr.shape[0]
        gp = (g / (h * wd)).view(n_img, 1, 1)
        # three passes over [N,C,h,w]: (w·2g/n² + gκ), times f, minus wr·2g/n (fused, no temporaries)
        out = torch.addcmul((gp * kappa)[:, None], w.view(1, c, 1, 1), (2 * gp * inv * inv)[:, None])
        out.mul_(f)
        out.view(n_img // B, B, c, h, wd).addcmul_(wr, (2 * gp * inv).view(n_img // B, B, 1, h, wd), value=-1)
        return out, None, None, None


def reference_loss(perceptual, reference: torch.Tensor):
    """``img → perceptual(img, reference)`` for many images against one fixed ``reference`` ``[B,3,H,W]`` (images
    in batches of ``m·B``, image ``i`` against reference ``i mod B``). SyncDiffusion compares every view with
    one anchor, so for an ``lpips.LPIPS`` this is computed more cheaply than ``LPIPS.forward`` does, with the
    same value:

    * the reference's features are computed once, not once per image;
    * each layer's term ``mean_hw Σ_c w_c (f̂_c − r̂_c)²`` (``f̂ = f / (‖f‖_c + ε)``, ``r̂`` the reference's, ``w``
      the LPIPS linear weights) is expanded as ``Σ_c w_c f_c² / n² − 2 Σ_c w_c r̂_c f_c / n + Σ_c w_c r̂_c²`` with
      ``n = ‖f‖_c + ε``: three channel reductions of the raw features instead of normalising, subtracting and
      squaring full-size tensors, which took a third of the LPIPS gradient's time on a CPU;
    * each layer's term is one autograd function (:class:`_ReferenceLayerTerm`) whose backward is the closed-form
      gradient, a few passes over the features instead of the chain of products, sums and their accumulations
      autograd would record (8–11 % less time for the whole VGG LPIPS gradient on this CPU).

    Equal to ``LPIPS.forward`` within float rounding, value and gradient (tested); a feature pixel that is exactly
    zero in every channel gets a zero gradient where ``LPIPS.forward``'s ``sqrt`` gives NaN.
    """
    B = reference.shape[0]
    names = ("scaling_layer", "net", "lins", "L", "version", "lpips", "spatial")
    if not all(hasattr(perceptual, n) for n in names) or perceptual.spatial:
        return lambda img: perceptual(img, reference.repeat(img.shape[0] // B, 1, 1, 1).to(img))
    import lpips as _lpips

    m = perceptual

    def prep(x):
        return m.scaling_layer(x) if m.version == "0.1" else x

    def channel_weights(kk: int, c: int, like: torch.Tensor) -> torch.Tensor:
        convs = [mod for mod in m.lins[kk].modules() if isinstance(mod, torch.nn.Conv2d)]
        if len(convs) != 1 or convs[0].bias is not None or convs[0].weight.shape[:1] != (1,):
            raise TypeError("reference_loss: unexpected LPIPS linear layer (expected one bias-free 1x1 conv)")
        return convs[0].weight.reshape(c).to(like)

    with torch.no_grad():
        layers = []
        for kk, f in enumerate(m.net.forward(prep(reference))):
            w = channel_weights(kk, f.shape[1], f)
            r = _lpips.normalize_tensor(f)
            wr = w.view(1, -1, 1, 1) * r  # [B,C,h,w]
            layers.append((w, wr, (wr * r).sum(1)))  # Σ_c w r̂² [B,h,w]

    def loss(img):
        val = 0
        for (w, wr, rr), f in zip(layers, m.net.forward(prep(img))):
            val = val + _ReferenceLayerTerm.apply(f, w.to(f), wr.to(f), rr.to(f))
        return val.view(-1, 1, 1, 1)
    return loss


def load_lpips(net: str = "vgg", backbone_path: Optional[str] = None, search: Iterable[str] = (),
               device=None, allow_download: bool = False, random_backbone: bool = False):
    """An ``lpips.LPIPS`` (eval, frozen) with the backbone from a local torchvision file.

    Args:
        net: ``"vgg"`` (SyncDiffusion) or ``"alex"`` (faster, LPIPS' default) or ``"squeeze"``.
        backbone_path: the torchvision file (or a folder holding it), e.g. ``models/lpips/vgg16-397923af.pth``.
        search: more files/folders to look in (also the torch hub cache is checked).
        allow_download: fall back to lpips' own download when no file is found.
        random_backbone: random backbone, no file (tests only).

    Raises:
        FileNotFoundError: naming the file to place and where.
    """
    lpips = require("lpips", "SyncDiffusion's perceptual loss (LPIPS)")

    _backbone_file(net)  # validates ``net``
    where = [p for p in ([backbone_path] if backbone_path else []) + list(search) if p]
    path = None
    if not random_backbone:
        if backbone_path and os.path.isfile(backbone_path):
            path = backbone_path
        else:
            path = find_lpips_backbone(net, where)
        if path is None and not allow_download:
            raise FileNotFoundError(missing_backbone_message(net, where))
    use_download = path is None and not random_backbone
    model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=not use_download, verbose=False)
    if path is not None:
        load_lpips_backbone_weights(model, path)
    model = model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------------------------------

def crop_grid(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of ``window``-sized crops with ``stride`` (no wrap, no partial crops)."""
    if window > height or window > width:
        raise ValueError(f"crop window {window} is larger than the panorama {height}x{width}")
    ys = range(0, height - window + 1, stride)
    xs = range(0, width - window + 1, stride)
    return [(y, x) for y in ys for x in xs]


@torch.no_grad()
def intra_lpips(images: torch.Tensor, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                window: Optional[int] = None, stride: Optional[int] = None) -> torch.Tensor:
    """Intra-LPIPS of panoramas ``[B,3,H,W]`` in ``[-1, 1]``: mean over all pairs of crops of
    ``perceptual(crop_a, crop_b)`` (crops ``window`` = H by default, non-overlapping: stride = window).
    Lower = more coherent. Returns ``[B]``."""
    if images.ndim != 4:
        raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    B, _, H, W = images.shape
    window = window or min(H, W)
    stride = stride or window
    pos = crop_grid(H, W, window, stride)
    if len(pos) < 2:
        raise ValueError(f"intra-LPIPS needs at least 2 crops; the panorama {H}x{W} gives {len(pos)} of {window}")
    crops = torch.stack([images[:, :, y:y + window, x:x + window] for y, x in pos], 1)  # [B, N, 3, w, w]
    pairs = list(itertools.combinations(range(len(pos)), 2))
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    out = []
    for k in range(B):
        d = perceptual(crops[k, a], crops[k, b]).reshape(len(pairs), -1).mean(1)
        out.append(d.mean())
    return torch.stack(out)


def seam_score(images: torch.Tensor) -> torch.Tensor:
    """360° seam score of ``[B,C,H,W]``: ``mean|x[..., 0] - x[..., W-1]| / mean|x[..., k+1] - x[..., k]|``.

    ≈ 1 when the wrap-around edge is as continuous as any interior column pair; larger = visible seam."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"expected images [B,C,H,W] with W >= 3, got {tuple(images.shape)}")
    x = images.float()
    seam = (x[..., 0] - x[..., -1]).abs().mean(dim=(1, 2))
    interior = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    return seam / interior.clamp_min(1e-12)
