"""JointNet (Zhang et al., ICLR 2024): joint RGB + dense-modality diffusion from two coupled UNets.

Architecture (paper §3.1, Fig. 2c; layer names as in the released checkpoints):

* Two copies of a text-to-image UNet: the **RGB branch** (``<root>/unet/``) and the **dense branch**
  (``<root>/jointnet/``), each a :class:`JointNetUNet` (a diffusers ``UNet2DConditionModel`` with extra,
  zero-initialised *exchange layers*):

  ======================================  =====================  ================================================
  key                                     layer                  role
  ======================================  =====================  ================================================
  ``jointnet_rgb_in_trans``               Conv2d J→C0, k×k       other branch's noisy latent, added after conv_in
  ``jointnet_down_blocks.{0..N-1}``       1×1 conv C→C           on this branch's N skip tensors (12 for SD)
  ``jointnet_mid_block``                  1×1 conv Cmid→Cmid     on this branch's mid-block output
  ``jointnet_masked_latent_conv``         Conv2d (2+C+J)→C0      inpaint model only: [own mask, own masked latent,
                                                                 other mask, other masked latent], after conv_in
  ======================================  =====================  ================================================

* One denoising step (:meth:`JointNet.forward`)::

      h_rgb   = conv_in(x_rgb)   + in_trans_rgb(x_dense)   [+ masked_conv_rgb(...)]
      h_dense = conv_in(x_dense) + in_trans_dense(x_rgb)   [+ masked_conv_dense(...)]
      skips_b, mid_b = down_b(h_b), mid_b(...)                         (b ∈ {rgb, dense}, independent)
      skips_rgb'  = skips_rgb   + zero_down_dense(skips_dense),  mid_rgb'   = mid_rgb   + zero_mid_dense(mid_dense)
      skips_dense'= skips_dense + zero_down_rgb(skips_rgb),      mid_dense' = mid_dense + zero_mid_rgb(mid_rgb)
      ε_rgb, ε_dense = up_rgb(mid_rgb', skips_rgb'), up_dense(mid_dense', skips_dense')
      output = cat([ε_rgb, ε_dense], dim=1)           # [B, 2·C_lat, h, w]

* Output-preserving principle: with every exchange layer at zero each branch is exactly its plain UNet.

Loading / saving uses the official folder layout ``<root>/unet/`` + ``<root>/jointnet/`` (each
``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}``, extra config keys ``joint_in_channels``
and ``has_masked_latent_input``).
"""
from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from . import prediction as P
from .denoiser import TextConditioning, _expand_batch, apply_cfg

RGB_SUBFOLDER = "unet"
DENSE_SUBFOLDER = "jointnet"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Config keys that must agree between the two branches for the exchange layers to line up.
_SHARED_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
                "cross_attention_dim", "has_masked_latent_input", "conv_in_kernel")


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def _init_signature():
    """Parent ``__init__`` signature + ``joint_in_channels`` and ``has_masked_latent_input`` (keyword only)."""
    parent = inspect.signature(UNet2DConditionModel.__init__)
    params = list(parent.parameters.values())
    extra = [
        inspect.Parameter("joint_in_channels", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("has_masked_latent_input", inspect.Parameter.KEYWORD_ONLY, default=False),
    ]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.name != "self" else p for p in params]
    return parent.replace(parameters=params + extra)


class JointNetUNet(UNet2DConditionModel):
    """One JointNet branch: a ``UNet2DConditionModel`` plus its zero-initialised exchange layers.

    Extra config:
        joint_in_channels: latent channels of the *other* branch (default: ``in_channels``).
        has_masked_latent_input: build ``jointnet_masked_latent_conv`` (mask-conditioned inpaint model); the
            branch input is then ``[latent (C), mask (1), masked latent (C)]``.

    All arguments are keyword-only (the diffusers config machinery passes them by name).
    """

    def _jn_init(self, joint_in_channels: Optional[int] = None, has_masked_latent_input: bool = False, **kwargs):
        super().__init__(**kwargs)
        cfg = self.config
        if joint_in_channels is None:
            joint_in_channels = cfg.in_channels
            self.register_to_config(joint_in_channels=joint_in_channels)
        c0 = cfg.block_out_channels[0]
        k = cfg.conv_in_kernel
        pad = (k - 1) // 2
        self.jointnet_rgb_in_trans = _zero(nn.Conv2d(joint_in_channels, c0, kernel_size=k, padding=pad))
        self.jointnet_down_blocks = nn.ModuleList(
            [_zero(nn.Conv2d(c, c, kernel_size=1)) for c in self._skip_channels()])
        c_mid = cfg.block_out_channels[-1]
        self.jointnet_mid_block = _zero(nn.Conv2d(c_mid, c_mid, kernel_size=1))
        if has_masked_latent_input:
            self._add_masked_latent_conv()

    __init__ = register_to_config(_jn_init)
    __init__.__signature__ = _init_signature()

    # ---- structure ---------------------------------------------------------------------------------------

    def _skip_channels(self) -> list[int]:
        """Channels of the skip tensors the down path produces (conv_in output first), read off the blocks."""
        chans = [self.config.block_out_channels[0]]
        for i, blk in enumerate(self.down_blocks):
            c = self.config.block_out_channels[i]
            chans += [c] * len(blk.resnets)
            if getattr(blk, "downsamplers", None) is not None:
                chans += [c] * len(blk.downsamplers)
        return chans

    @property
    def num_skips(self) -> int:
        return len(self.jointnet_down_blocks)

    def _add_masked_latent_conv(self) -> None:
        cfg = self.config
        k = cfg.conv_in_kernel
        cin = 1 + cfg.in_channels + 1 + cfg.joint_in_channels
        self.jointnet_masked_latent_conv = _zero(
            nn.Conv2d(cin, cfg.block_out_channels[0], kernel_size=k, padding=(k - 1) // 2))

    def extend_masked_latent_conv(self) -> None:
        """Turn a joint-generation branch into a mask-conditioned one (stage 3); the new conv is zero."""
        if not self.config.has_masked_latent_input:
            self.register_to_config(has_masked_latent_input=True)
            p = next(self.parameters())
            self._add_masked_latent_conv()
            self.jointnet_masked_latent_conv.to(device=p.device, dtype=p.dtype)

    def exchange_parameter_names(self) -> list[str]:
        """Names of the exchange-layer parameters (everything a plain UNet does not have)."""
        return [n for n, _ in self.named_parameters() if n.startswith("jointnet_")]

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, has_masked_latent_input: bool = False,
                  joint_in_channels: Optional[int] = None) -> "JointNetUNet":
        """A branch with ``unet``'s weights and zero exchange layers (same dtype/device as ``unet``)."""
        cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        cfg.pop("joint_in_channels", None)
        cfg.pop("has_masked_latent_input", None)
        model = cls.from_config(dict(cfg, joint_in_channels=joint_in_channels,
                                     has_masked_latent_input=has_masked_latent_input))
        p = next(unet.parameters())
        if p.dtype != torch.float32 or p.device.type != "cpu":
            nn.Module.to(model, device=p.device, dtype=p.dtype)  # (ModelMixin.to warns spuriously on casts)
        sd = {k: v for k, v in unet.state_dict().items() if not k.startswith("jointnet_")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        extra = set(model.exchange_parameter_names())
        bad = [k for k in missing if k not in extra]
        if bad or unexpected:
            raise ValueError(f"UNet weights do not fit a JointNet branch (missing {bad[:5]}, unexpected {unexpected[:5]})")
        return model

    # ---- forward in two halves --------------------------------------------------------------------------

    def forward_down_mid(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                         joint_input: Optional[torch.Tensor] = None,
                         cross_attention_kwargs: Optional[dict] = None):
        """Down path + mid block.

        Args:
            sample: ``[B, C, h, w]`` this branch's noisy latent; for the mask-conditioned model
                ``[B, C+1+C, h, w]`` = ``[latent, mask, masked latent]``.
            joint_input: the other branch's input, same layout (``J`` or ``J+1+J`` channels), or ``None``.

        Returns:
            ``(exchange_skips, exchange_mid, context)``: this branch's skips/mid through its own zero convs
            (to be added to the **other** branch), and everything :meth:`forward_up` needs.
        """
        cfg = self.config
        up_factor = 2 ** self.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])

        masked = None
        if cfg.has_masked_latent_input:
            if joint_input is None:
                raise ValueError("the mask-conditioned JointNet needs the other branch's input (joint_input)")
            c, j = cfg.in_channels, cfg.joint_in_channels
            if sample.shape[1] != 2 * c + 1 or joint_input.shape[1] != 2 * j + 1:
                raise ValueError(f"mask-conditioned branch expects [latent, mask, masked latent] inputs with "
                                 f"{2 * c + 1} and {2 * j + 1} channels, got {sample.shape[1]} and {joint_input.shape[1]}")
            masked = torch.cat([sample[:, c:], joint_input[:, j:]], dim=1)
            sample, joint_input = sample[:, :c], joint_input[:, :j]
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
            joint_input = None if joint_input is None else 2 * joint_input - 1.0

        t_emb = self.get_time_embed(sample=sample, timestep=timestep)
        emb = self.time_embedding(t_emb, None)
        class_emb = self.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if cfg.class_embeddings_concat else emb + class_emb
        aug = self.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        if aug is not None:
            emb = emb + aug
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self.process_encoder_hidden_states(encoder_hidden_states, {})

        h = self.conv_in(sample)
        if joint_input is not None:
            h = h + self.jointnet_rgb_in_trans(joint_input)
        if masked is not None:
            h = h + self.jointnet_masked_latent_conv(masked)

        skips = (h,)
        for blk in self.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                h, res = blk(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states,
                             cross_attention_kwargs=cross_attention_kwargs)
            else:
                h, res = blk(hidden_states=h, temb=emb)
            skips += res
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states,
                                   cross_attention_kwargs=cross_attention_kwargs)
            else:
                h = self.mid_block(h, emb)
        if len(skips) != len(self.jointnet_down_blocks):
            raise RuntimeError(f"{len(skips)} skip tensors but {len(self.jointnet_down_blocks)} exchange convs")
        ex_skips = tuple(conv(s) for conv, s in zip(self.jointnet_down_blocks, skips))
        ex_mid = self.jointnet_mid_block(h)
        ctx = dict(sample=h, emb=emb, skips=skips, encoder_hidden_states=encoder_hidden_states,
                   forward_upsample_size=forward_upsample_size, cross_attention_kwargs=cross_attention_kwargs)
        return ex_skips, ex_mid, ctx

    def forward_up(self, ctx: dict, add_skips: Optional[tuple] = None,
                   add_mid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Up path from :meth:`forward_down_mid`'s context, adding the other branch's exchange tensors.

        The context is **consumed**: its tensors are taken out of the dict (so they can be freed as the up path
        goes), and a second call with the same context raises instead of silently adding the exchange tensors
        twice. The tensors themselves are never modified (sums are new tensors, one skip at a time).
        """
        if ctx.get("consumed"):
            raise RuntimeError("this forward_down_mid context was already used by forward_up; run "
                               "forward_down_mid again (a context holds one step's activations)")
        h, skips = ctx.pop("sample"), list(ctx.pop("skips"))
        ctx["consumed"] = True
        emb, ehs, cak = ctx["emb"], ctx["encoder_hidden_states"], ctx["cross_attention_kwargs"]
        if add_skips is not None:
            if len(add_skips) != len(skips):
                raise ValueError(f"{len(add_skips)} exchange skips for {len(skips)} skip tensors")
            for k, a in enumerate(add_skips):
                skips[k] = skips[k] + a
        if add_mid is not None:
            h = h + add_mid
        skips = tuple(skips)
        upsample_size = None
        for i, blk in enumerate(self.up_blocks):
            res = skips[-len(blk.resnets):]
            skips = skips[: -len(blk.resnets)]
            if i < len(self.up_blocks) - 1 and ctx["forward_upsample_size"]:
                upsample_size = skips[-1].shape[2:]
            if getattr(blk, "has_cross_attention", False):
                h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs,
                        cross_attention_kwargs=cak, upsample_size=upsample_size)
            else:
                h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)


# ------------------------------------------------------------------------------------------------------------


def _find_weights(folder: str) -> str:
    for name in WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    raise FileNotFoundError(f"{folder} has no {' or '.join(WEIGHT_NAMES)}")


class JointNet(nn.Module):
    """The two coupled branches; ``forward`` is one joint denoising step.

    Args:
        rgb: RGB branch (``unet/``).
        dense: dense branch (``jointnet/``: depth or normals).
    """

    def __init__(self, rgb: JointNetUNet, dense: JointNetUNet):
        super().__init__()
        self.rgb = rgb
        self.dense = dense
        self._check()

    # ---- construction / IO -------------------------------------------------------------------------------

    def _check(self) -> None:
        a, b = self.rgb.config, self.dense.config
        diffs = [k for k in _SHARED_KEYS if _norm(a.get(k)) != _norm(b.get(k))]
        if a.joint_in_channels != b.in_channels or b.joint_in_channels != a.in_channels:
            diffs.append("in_channels/joint_in_channels")
        if a.out_channels != a.in_channels or b.out_channels != b.in_channels:
            diffs.append("out_channels (must equal in_channels)")
        if diffs:
            raise ValueError("JointNet branch configs do not match (unet/ vs jointnet/ config.json): "
                             + ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" if k in a else k for k in diffs))

    @property
    def latent_channels(self) -> tuple[int, int]:
        return self.rgb.config.in_channels, self.dense.config.in_channels

    @property
    def has_masked_latent_input(self) -> bool:
        return bool(self.rgb.config.has_masked_latent_input)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.rgb.config.cross_attention_dim)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def activation_bytes(self, batch: int, height: int, width: int, text_len: int = 77) -> int:
        """Memory to plan for one forward on ``batch`` latents of ``height × width`` (CFG doubles the batch the
        denoiser sends), measured on a meta twin of this model (:mod:`jointcore.runtime.memory`)."""
        from .runtime import memory as M

        m = M.twin(self)
        cr, cd = self.latent_channels
        x = torch.empty(batch, cr + cd, height, width, device="meta", dtype=self.dtype)
        emb = torch.empty(batch, text_len, self.cross_attention_dim, device="meta", dtype=self.dtype)
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        kw = {}
        if self.has_masked_latent_input:
            one = torch.empty(batch, 1, height, width, device="meta", dtype=self.dtype)
            kw = dict(mask_rgb=one, masked_rgb=x[:, :cr], mask_dense=one, masked_dense=x[:, cr:])
        return M.estimate(M.peak_forward_bytes(m, x, t, emb, **kw))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, has_masked_latent_input: bool = False) -> "JointNet":
        """Two copies of a (SD 1.x/2.x) UNet with zero exchange layers: output-preserving at initialisation."""
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError(f"JointNet needs a UNet with in_channels == out_channels (a text-to-image UNet), got "
                             f"{unet.config.in_channels} -> {unet.config.out_channels}")
        rgb = JointNetUNet.from_unet(unet, has_masked_latent_input)
        dense = JointNetUNet.from_unet(copy.deepcopy(unet), has_masked_latent_input)
        return cls(rgb, dense)

    @classmethod
    def from_pretrained(cls, root: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "JointNet":
        """Load ``<root>/unet/`` (RGB) + ``<root>/jointnet/`` (dense), ``.safetensors`` or ``.bin``."""
        from .models import preflight as PF

        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"JointNet folder {root!r} does not exist")
        branches = []
        for sub in (RGB_SUBFOLDER, DENSE_SUBFOLDER):
            folder = os.path.join(root, sub)
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise FileNotFoundError(
                    f"{root!r} is not a JointNet folder: missing {sub}/config.json (expected {RGB_SUBFOLDER}/ = RGB "
                    f"branch and {DENSE_SUBFOLDER}/ = dense branch, each config.json + diffusion_pytorch_model."
                    f"safetensors or .bin, as in the released rgbd_finetune_sd21b / rgbd_inpaint_sd21b zips)")
            w = _find_weights(folder)
            kw: dict[str, Any] = dict(use_safetensors=w.endswith(".safetensors"))
            # config read, size and weight shapes checked before anything is allocated (errors name the file)
            PF.preflight(PF.diffusers_build(JointNetUNet), folder, PF.DIFFUSERS_STEMS, kw["use_safetensors"],
                         bytes_per_param=torch.finfo(torch_dtype or torch.float32).bits // 8,
                         ignore_missing=("jointnet_",))  # a plain UNet folder: explained below
            if torch_dtype is not None:
                kw["torch_dtype"] = torch_dtype
            model, info = JointNetUNet.from_pretrained(folder, output_loading_info=True, **kw)
            if info.get("missing_keys"):
                raise ValueError(f"{folder}: weights lack {len(info['missing_keys'])} keys of a JointNet branch "
                                 f"(e.g. {sorted(info['missing_keys'])[:3]}); is this a plain UNet folder?")
            branches.append(model.eval())
        model = cls(*branches)
        if device is not None:
            model.to(device)
        return model

    def save_pretrained(self, root: Union[str, os.PathLike], safe_serialization: bool = True) -> None:
        """Write the official layout (``safe_serialization=False`` gives ``.bin`` as the released zips)."""
        root = os.fspath(root)
        self.rgb.save_pretrained(os.path.join(root, RGB_SUBFOLDER), safe_serialization=safe_serialization)
        self.dense.save_pretrained(os.path.join(root, DENSE_SUBFOLDER), safe_serialization=safe_serialization)

    def extend_masked_latent_conv(self) -> None:
        self.rgb.extend_masked_latent_conv()
        self.dense.extend_masked_latent_conv()

    def exchange_parameters(self):
        """Parameters of all exchange layers in both branches."""
        for branch in (self.rgb, self.dense):
            names = set(branch.exchange_parameter_names())
            for n, p in branch.named_parameters():
                if n in names:
                    yield p

    # ---- one joint step -----------------------------------------------------------------------------------

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                mask_rgb: Optional[torch.Tensor] = None, masked_rgb: Optional[torch.Tensor] = None,
                mask_dense: Optional[torch.Tensor] = None, masked_dense: Optional[torch.Tensor] = None,
                cross_attention_kwargs: Optional[dict] = None) -> torch.Tensor:
        """One joint denoising step.

        Args:
            sample: ``[B, C_rgb + C_dense, h, w]`` noisy latents ``[rgb, dense]``.
            timestep: scalar or ``[B]``.
            encoder_hidden_states: ``[B, L, D]`` text embedding (shared by both branches).
            mask_rgb, masked_rgb, mask_dense, masked_dense: mask-conditioned model only: ``[B, 1, h, w]`` masks
                (1 = generate) and ``[B, C, h, w]`` masked latents (``latent · (mask < 0.5)``).

        Returns:
            ``[B, C_rgb + C_dense, h, w]`` = ``[ε_rgb, ε_dense]`` (the branches' native prediction type).
        """
        cr, cd = self.latent_channels
        if sample.ndim != 4 or sample.shape[1] != cr + cd:
            raise ValueError(f"JointNet expects latents [B, {cr + cd}, h, w] ([rgb {cr}, dense {cd}]), "
                             f"got {tuple(sample.shape)}")
        x_rgb, x_dense = sample[:, :cr], sample[:, cr:]
        if self.has_masked_latent_input:
            parts = (mask_rgb, masked_rgb, mask_dense, masked_dense)
            if any(p is None for p in parts):
                raise ValueError("this JointNet is mask-conditioned (has_masked_latent_input): pass mask_rgb, "
                                 "masked_rgb, mask_dense and masked_dense (ones/zeros for plain joint generation)")
            x_rgb = torch.cat([x_rgb, mask_rgb.to(x_rgb), masked_rgb.to(x_rgb)], dim=1)
            x_dense = torch.cat([x_dense, mask_dense.to(x_dense), masked_dense.to(x_dense)], dim=1)
        ex_s_rgb, ex_m_rgb, ctx_rgb = self.rgb.forward_down_mid(x_rgb, timestep, encoder_hidden_states, x_dense,
                                                                cross_attention_kwargs)
        ex_s_dense, ex_m_dense, ctx_dense = self.dense.forward_down_mid(x_dense, timestep, encoder_hidden_states,
                                                                        x_rgb, cross_attention_kwargs)
        eps_rgb = self.rgb.forward_up(ctx_rgb, ex_s_dense, ex_m_dense)
        eps_dense = self.dense.forward_up(ctx_dense, ex_s_rgb, ex_m_rgb)
        return torch.cat([eps_rgb, eps_dense], dim=1)


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# ------------------------------------------------------------------------------------------------------------


@dataclass
class JointMaskedInputs:
    """Mask-conditioning inputs of the inpaint JointNet, at latent resolution.

    ``mask_*``: ``[B or 1, 1, h, w]`` (1 = generate, 0 = keep); ``masked_*``: ``[B or 1, C, h, w]`` the known
    latents already multiplied by ``(mask < 0.5)``.
    """

    mask_rgb: torch.Tensor
    masked_rgb: torch.Tensor
    mask_dense: torch.Tensor
    masked_dense: torch.Tensor

    def expand(self, batch: int) -> "JointMaskedInputs":
        return JointMaskedInputs(*(_expand_batch(t, batch) for t in
                                   (self.mask_rgb, self.masked_rgb, self.mask_dense, self.masked_dense)))

    def repeat2(self) -> "JointMaskedInputs":
        return JointMaskedInputs(*(torch.cat([t, t]) for t in
                                   (self.mask_rgb, self.masked_rgb, self.mask_dense, self.masked_dense)))


@dataclass
class JointConditioning:
    """Text conditioning (with CFG) plus optional mask-conditioning inputs for the inpaint model."""

    text: TextConditioning
    masked: Optional[JointMaskedInputs] = None


class JointNetDenoiser:
    """:class:`jointcore.denoiser.Denoiser` adapter for a :class:`JointNet`.

    ``x_t``: ``[B, C_rgb + C_dense, h, w]`` (``[rgb4, dense4]``); output: same shape, ``prediction_type``
    (epsilon for the released models). ``cond``: :class:`TextConditioning` or :class:`JointConditioning`.
    CFG is applied jointly to all 8 channels (one batched pass over ``[uncond, cond]``; the mask inputs are
    the same for both halves, as in the official inpaint pipeline).
    """

    def __init__(self, model: JointNet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        P._check(prediction_type)
        self.model = model
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.prediction_type = prediction_type

    def _run(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
             masked: Optional[JointMaskedInputs]) -> torch.Tensor:
        dt, dev = self.model.dtype, self.model.device
        kw = {}
        if masked is not None:
            kw = dict(mask_rgb=masked.mask_rgb, masked_rgb=masked.masked_rgb, mask_dense=masked.mask_dense,
                      masked_dense=masked.masked_dense)
            kw = {k: v.to(device=dev, dtype=dt) for k, v in kw.items()}
        out = self.model(x.to(device=dev, dtype=dt), t.to(dev), emb.to(device=dev, dtype=dt), **kw)
        return out.to(device=x.device, dtype=x.dtype)

    def __call__(self, x_t: torch.Tensor, t, cond: Union[TextConditioning, JointConditioning]) -> torch.Tensor:
        if isinstance(cond, TextConditioning):
            cond = JointConditioning(cond)
        if not isinstance(cond, JointConditioning):
            raise TypeError(f"JointNetDenoiser needs a TextConditioning or JointConditioning, got {type(cond).__name__}")
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        masked = cond.masked.expand(B) if cond.masked is not None else None
        if self.model.has_masked_latent_input and masked is None:
            raise ValueError("this JointNet is mask-conditioned: give JointConditioning(text, masked=JointMaskedInputs"
                             "(...)) (all-ones masks and zero latents for plain joint generation)")
        text = cond.text
        D = self.model.cross_attention_dim
        if text.cond.shape[-1] != D:
            raise ValueError(f"text embedding width {text.cond.shape[-1]} does not match the JointNet's "
                             f"cross_attention_dim {D} (use the text encoder of the base model: 1024 for SD 2.x, "
                             f"768 for SD 1.x)")
        if not text.uses_cfg:
            return self._run(x_t, t, _expand_batch(text.cond, B), masked)
        emb = torch.cat([_expand_batch(text.uncond, B), _expand_batch(text.cond, B)])
        out = self._run(torch.cat([x_t, x_t]), torch.cat([t, t]), emb, masked.repeat2() if masked else None)
        u, c = out.chunk(2)
        return apply_cfg(u, c, text.guidance_scale)
