"""The official SyncDiffusion sampling loop's structure, one view at a time, for tests and the speed bench.

Transcribed by structure from ``syncdiffusion/syncdiffusion_model.py`` (KAIST-Visual-AI-Group/SyncDiffusion,
commit 2b48377, MIT) around the pack's denoiser, decoder and DDIM step, so that its result can be compared with
:func:`jointcore.tiled.tiled_sample` and its time is what the official code spends. Per step:

1. on a synchronised step, the anchor (the middle view) is denoised and decoded without gradient;
2. for **every** view, the anchor included: on a synchronised step the crop is denoised with gradient (CFG), its
   x0 decoded, ``LPIPS(image, anchor image)`` evaluated (``LPIPS.forward`` computes the anchor's features again
   each time) and differentiated; the gradient is applied to every view but the anchor, whose gradient pass is
   computed and then discarded as in the official code; then the (updated) crop is denoised without gradient
   and stepped;
3. the stepped views are averaged with uniform weights (MultiDiffusion).

Differences from the official file, none of which changes the structure: DDIM targets are the pack's
(:func:`jointcore.sampling.next_timesteps`, final ᾱ = 1), the official uses diffusers' ``t − T/n`` and
``alphas_cumprod[0]`` for the last step; images stay in [−1, 1] (the official maps to [0, 1], clamps, and maps
back: the same values); no circular views.
"""
from __future__ import annotations

import torch

from jointcore import prediction as P
from jointcore.sampling import ddim_step, next_timesteps
from jointcore.tiled import make_views


def official_syncdiffusion(denoiser, latent, timesteps, cond, decode, lpips, window: int, stride: int,
                           weight: float = 20.0, decay: float = 0.95, sync_freq: int = 1, sync_thres: int = 50):
    ab = denoiser.alphas_cumprod
    B, C, H, W = latent.shape
    views = make_views(H, W, (window, window), (stride, stride), False, (0, 0))
    anchor = len(views) // 2
    ts = [int(t) for t in timesteps]
    prev = next_timesteps(ts)

    def x0_of(x, tt):
        return P.to_x0(denoiser(x, tt, cond), x, tt, ab, denoiser.prediction_type)

    for i, (t, tp) in enumerate(zip(ts, prev)):
        tt = torch.full((B,), t, dtype=torch.long, device=latent.device)
        a_t, a_p = float(ab[t]), (float(ab[tp]) if tp >= 0 else 1.0)
        sync = (i + 1) % sync_freq == 0 and i < sync_thres
        value = torch.zeros_like(latent)
        count = torch.zeros_like(latent)
        if sync:
            with torch.no_grad():
                v = views[anchor]
                anchor_img = decode(x0_of(latent[:, :, v.top:v.top + v.height, v.left:v.left + v.width], tt))
                anchor_img = anchor_img.clamp(-1, 1)
        for j, v in enumerate(views):
            crop = latent[:, :, v.top:v.top + v.height, v.left:v.left + v.width].detach()
            copy = crop.clone()
            if sync:
                with torch.enable_grad():
                    crop = crop.requires_grad_()
                    img = decode(x0_of(crop, tt)).clamp(-1, 1)
                    loss = lpips(img, anchor_img)
                    (g,) = torch.autograd.grad(loss.sum(), crop)
                if j != anchor:
                    copy = copy - weight * decay ** i * g
            with torch.no_grad():
                out = denoiser(copy, tt, cond)
                x0 = P.to_x0(out, copy, tt, ab, denoiser.prediction_type)
                eps = P.to_eps(out, copy, tt, ab, denoiser.prediction_type)
                stepped = ddim_step(copy, x0, eps, a_t, a_p).to(latent.dtype)
            value[:, :, v.top:v.top + v.height, v.left:v.left + v.width] += stepped
            count[:, :, v.top:v.top + v.height, v.left:v.left + v.width] += 1
        latent = torch.where(count > 0, value / count, value)
    return latent
