"""ST-MEM: a masked autoencoder of multi-lead ECG with lead-aware tokens, as a library model (a Table-2 baseline).

Written from the description of Na et al., "Guiding Masked Representation Learning to Capture Spatio-Temporal
Relationship of Electrocardiogram" (ICLR 2024); no code was copied.

Model:

- Each lead of ``x`` (B, C, T = ``input_dim``) is cut into ``N = input_dim / patch_size`` non-overlapping patches
  (published: 75 samples at 250 Hz, 2250 samples, 30 patches per lead). One patch embedding is shared by all
  leads: a Linear layer (default) or LayerNorm -> Linear -> LayerNorm (``patch_norm=True``, published).
- Every patch token gets a temporal positional embedding (one per patch position, shared across leads; learned by
  default, fixed sine-cosine with ``pos_embedding="sincos"`` as published) and a learned embedding of its lead.
  Each lead's run of tokens is delimited by a learned SEP token at its start and its end, with positional slots 0
  and N + 1 and the lead's embedding, so a lead contributes N + 2 tokens.
- A ViT encoder (pre-norm transformer blocks, attention by ``torch.nn.functional.scaled_dot_product_attention``,
  a final LayerNorm) sees the tokens of all present leads at once.
- Pre-training: in each lead independently, :func:`kept_patches` random patches are kept (mask ratio 0.75:
  ``round`` keeps 8 of 30 by default, ``keep_rounding="floor"`` keeps the published 7). The encoder sees the kept
  patches and the SEP tokens only. A lead-wise decoder (a narrower transformer run on each lead's tokens
  separately, with mask tokens in the hidden slots) predicts every patch; the loss is the MSE on the hidden patches
  only, against targets normalised per patch (:func:`masked_patch_mse`).
- Fine-tuning features (:meth:`STMEM.features`): no masking; the mean of the encoder's output tokens over the patch
  tokens of the present leads, SEP tokens excluded: (B, width). By default each token passes the final LayerNorm
  before the mean; ``pool="mean_then_norm"`` (published) applies the LayerNorm to the mean.

Presets (:data:`ST_MEM_PRESETS`, :meth:`STMEM.from_preset`): ``"paper"`` is ViT-B (width 768, 12 blocks, 12 heads,
MLP ratio 4) with a 256-wide, 4-block decoder; ``"small"`` (width 64, 3 blocks, 4 heads; decoder 32 wide, 2 blocks)
trains on a CPU; ``"published"`` is ``"paper"`` with every switch at the published choice (sin-cos positions,
normalised patch embedding, 7 kept patches, mean then LayerNorm). All default to 2250 samples in patches of 75.

Departures from the published model and code, and choices the paper leaves open (we did not read the authors'
code; where this list names their behaviour it is what the paper describes or what the comparison brief reports):

- Absent leads are dropped tokens, not zero signals. A lead that is masked out (``mask`` False) or not given (its
  name not in ``leads``) contributes no token; in a batch whose samples have different lead sets the missing tokens
  are excluded by a key-padding attention mask, so a batch equals its samples run one by one, and a 12-lead model
  takes any named subset (e.g. the 6 limb leads) per sample. The published pipeline feeds one fixed lead layout per
  run; reported subset handling there (broadcasting one lead, or an error) is not reproduced.
- Lead embeddings are bound by lead name (``lead_names``), not by channel position: permuting the channels together
  with their names changes nothing. Aliases (``"avl"``, ``"LEAD_V1"``) are mapped to canonical names.
- The decoder also adds a learned lead embedding (and its own positional embedding) to each lead's tokens, so that
  one shared decoder knows which lead it reconstructs (our choice).
- Target normalisation uses each target patch's mean and population variance (divide by ``patch_size``):
  ``(t - mean) / sqrt(var + eps)``.
- Switchable departures, kept as defaults so that models pre-trained by earlier versions still load (their
  records name ``preset`` "paper" or "small"); the ``"published"`` preset turns all four to the published choice:
  learned instead of fixed sin-cos positions (``pos_embedding``); a plain Linear patch embedding instead of
  LayerNorm -> Linear -> LayerNorm (``patch_norm``); ``round((1 - mask_ratio) * N)`` kept patches with Python's
  rounding (8 of 30, an effective mask ratio of 0.733) instead of the published 7 (0.767) (``keep_rounding``);
  LayerNorm then mean instead of mean then LayerNorm for the fine-tuning feature (``pool``).
- Patches per lead at other lengths: the registry (:func:`kale_ext.embed.zoo.stmem_patch_size`) picks the divisor
  of the input length closest to 30 patches: 30 x 75 at 2250 samples, but 25 x 200 at 5000 and 25 x 20 at 500
  (30 does not divide them); we keep the data's length rather than resample to 250 Hz and crop to 9 s.
- Standardisation: the signals arrive z-scored per lead (the shared cache of every model in the comparison), not
  per record as published; per-record scaling keeps the amplitude ratios between leads, which per-lead scaling
  removes. Not switchable inside the model (the per-lead scaling happens before it).
- Masks come from a ``torch.Generator`` when one is given; otherwise from the global torch RNG
  in training mode, and from a fixed seed (``eval_mask_seed``) in eval mode so validation losses are repeatable.
- No dropout or stochastic depth; no implicit crop or pad: ``input_dim`` must be a multiple of ``patch_size`` and
  inputs must have exactly ``input_dim`` samples (crop or resample them in prepdata first).

The loss lives here (the embed stage may not import predict); :mod:`kale_ext.predict.pretext` re-exports it with
the other pretext objectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kale_ext.loaddata.leads import CANONICAL_LEADS, try_canonical_lead_name

ST_MEM_PRESETS: dict[str, dict] = {
    "paper": {
        "input_dim": 2250,
        "patch_size": 75,
        "width": 768,
        "depth": 12,
        "heads": 12,
        "mlp_ratio": 4.0,
        "decoder_width": 256,
        "decoder_depth": 4,
        "decoder_heads": 4,
    },
    "small": {
        "input_dim": 2250,
        "patch_size": 75,
        "width": 64,
        "depth": 3,
        "heads": 4,
        "mlp_ratio": 4.0,
        "decoder_width": 32,
        "decoder_depth": 2,
        "decoder_heads": 4,
    },
}
# "published": the "paper" sizes with every switch set to the published model's choice (fixed sin-cos positions,
# LayerNorm -> Linear -> LayerNorm patch embedding, floor(0.25 x 30) = 7 kept patches, mean then LayerNorm).
ST_MEM_PRESETS["published"] = {
    **ST_MEM_PRESETS["paper"],
    "pos_embedding": "sincos",
    "patch_norm": True,
    "keep_rounding": "floor",
    "pool": "mean_then_norm",
}

POS_EMBEDDINGS = ("learned", "sincos")
KEEP_ROUNDINGS = ("round", "floor")
POOLS = ("norm_then_mean", "mean_then_norm")


def kept_patches(patches: int, mask_ratio: float, rounding: str = "round") -> int:
    """Patches per lead left visible at ``mask_ratio``: ``round`` or ``floor`` of ``(1 - mask_ratio) x patches``.

    With 30 patches at ratio 0.75: ``"round"`` (half to even) keeps 8 (effective ratio 0.733), ``"floor"`` keeps 7
    (0.767, the published model's count).
    """
    if rounding not in KEEP_ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not accepted; use one of {KEEP_ROUNDINGS}")
    value = (1.0 - mask_ratio) * patches
    return int(round(value)) if rounding == "round" else int(value + 1e-9)


def sincos_positions(positions: int, width: int) -> Tensor:
    """Fixed 1-D sine-cosine positional embeddings (Vaswani et al. 2017, as in MAE): (positions, width).

    The first half of the channels are sines, the second half cosines, of ``position / 10000^(2i / width)``.
    """
    if width % 2:
        raise ValueError(f"sin-cos positions need an even width, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
    angle = torch.arange(positions, dtype=torch.float64).unsqueeze(1) * omega.unsqueeze(0)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


def masked_patch_mse(
    pred: Tensor, target: Tensor, patch_mask: Tensor, normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """MSE over the scored (hidden) patches, with each target patch optionally normalised by its own mean and variance.

    ``normalize=True``: ``t' = (t - mean(t)) / sqrt(var(t) + eps)`` per patch, population variance. Per patch the
    squared error is averaged over its samples; the result is the mean over patches where ``patch_mask`` is True
    (0 when none is). Computed in float32.

    Args:
        pred: (..., patches, patch_size) predicted patches.
        target: (..., patches, patch_size) true patches (un-normalised).
        patch_mask: (..., patches) bool, True = the patch is scored (it was hidden from the encoder).
        normalize: normalise the targets per patch.
        eps: added to the variance.

    Returns:
        Scalar float32 tensor.
    """
    if pred.shape != target.shape or patch_mask.shape != pred.shape[:-1]:
        raise ValueError(
            f"pred and target must be (..., patches, patch_size) with patch_mask (..., patches); got "
            f"{tuple(pred.shape)}, {tuple(target.shape)} and {tuple(patch_mask.shape)}."
        )
    pred, target = pred.float(), target.float()
    scored = patch_mask.to(torch.bool)
    # where, not multiply: unscored patches (absent leads) may hold NaN placeholders.
    target = torch.where(scored.unsqueeze(-1), target, torch.zeros((), device=target.device))
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / torch.sqrt(var + eps)
    per_patch = (pred - target).square().mean(dim=-1)
    per_patch = torch.where(scored, per_patch, torch.zeros((), device=per_patch.device))
    return per_patch.sum() / scored.sum().clamp_min(1)


def random_patch_mask(
    batch: int,
    leads: int,
    patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    rounding: str = "round",
) -> Tensor:
    """Hide patches at random, independently in every (sample, lead), keeping exactly :func:`kept_patches` of them.

    Args:
        batch: B. leads: C. patches: N per lead.
        mask_ratio: r in [0, 1).
        generator: source of randomness (on ``device``); None uses the global torch RNG.
        device: device of the result.
        rounding: ``"round"`` or ``"floor"`` of ``(1 - r) * patches`` (see :func:`kept_patches`).

    Returns:
        (B, C, N) bool, True = hidden (masked out of the encoder, scored by the loss).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}; 0 disables masking.")
    keep = kept_patches(patches, mask_ratio, rounding)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {patches}; lower it or use shorter patches.")
    noise = torch.rand(batch, leads, patches, generator=generator, device=device)
    rank = noise.argsort(dim=-1).argsort(dim=-1)
    return rank >= keep


@dataclass
class STMEMOutput:
    """Result of one ST-MEM pre-training forward pass.

    Attributes:
        loss: scalar masked-patch MSE (see :func:`masked_patch_mse`).
        recon: (B, C, N, patch_size) the decoder's prediction of every patch of every input channel (in the target
            space: normalised per patch when ``norm_target``); zeros for absent leads. Only hidden patches are scored.
        target: (B, C, N, patch_size) the input cut into patches (un-normalised).
        patch_mask: (B, C, N) bool, True = hidden and scored; all False for absent leads.
        lead_mask: (B, C) bool, True = lead present.
    """

    loss: Tensor
    recon: Tensor
    target: Tensor
    patch_mask: Tensor
    lead_mask: Tensor


class PreNormBlock(nn.Module):
    """Transformer block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` (GELU), attention by fused SDPA.

    Args:
        width: token width W. heads: attention heads (W must be divisible). mlp_ratio: MLP hidden = ratio * W.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}; pick heads that divide the width.")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Apply the block.

        Args:
            x: (B, S, W) tokens.
            key_mask: (B, S) bool, True = a real token others may attend to; None = all real.

        Returns:
            (B, S, W).
        """
        b, s, w = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.norm2(x))


class STMEM(nn.Module):
    """ST-MEM masked autoencoder over named ECG leads (see the module docstring for the model and its departures).

    Args:
        lead_names: the leads the model has embeddings for (default the canonical 12).
        input_dim: samples per lead T; a multiple of ``patch_size``.
        patch_size: samples per patch P.
        width: encoder width W. depth: encoder blocks. heads: encoder attention heads.
        mlp_ratio: MLP hidden width / block width (encoder and decoder).
        decoder_width: decoder width. decoder_depth: decoder blocks. decoder_heads: decoder attention heads.
        mask_ratio: share of each lead's patches hidden in pre-training.
        norm_target: normalise target patches per patch in the loss.
        eps: variance epsilon of the target normalisation.
        eval_mask_seed: seed of the masks drawn in eval mode without a generator.
        pos_embedding: ``"learned"`` positional embeddings (ours) or fixed ``"sincos"`` (published), encoder and
            decoder.
        patch_norm: patch embedding LayerNorm -> Linear -> LayerNorm (published) instead of a plain Linear.
        keep_rounding: kept patches per lead, ``"round"`` (ours: 8 of 30) or ``"floor"`` (published: 7 of 30).
        pool: fine-tuning feature: ``"norm_then_mean"`` (ours: mean of the final-LayerNorm tokens) or
            ``"mean_then_norm"`` (published: the final LayerNorm of the mean token).
    """

    def __init__(
        self,
        lead_names: Sequence[str] = CANONICAL_LEADS,
        input_dim: int = 2250,
        patch_size: int = 75,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_width: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_target: bool = True,
        eps: float = 1e-6,
        eval_mask_seed: int = 0,
        pos_embedding: str = "learned",
        patch_norm: bool = False,
        keep_rounding: str = "round",
        pool: str = "norm_then_mean",
    ) -> None:
        super().__init__()
        for value, accepted, name in (
            (pos_embedding, POS_EMBEDDINGS, "pos_embedding"),
            (keep_rounding, KEEP_ROUNDINGS, "keep_rounding"),
            (pool, POOLS, "pool"),
        ):
            if value not in accepted:
                raise ValueError(f"{name} {value!r} is not accepted; use one of {accepted}")
        self.pos_embedding, self.keep_rounding, self.pool = pos_embedding, keep_rounding, pool
        if input_dim % patch_size:
            raise ValueError(
                f"input_dim {input_dim} is not a multiple of patch_size {patch_size}; crop the signals to "
                f"{input_dim // patch_size * patch_size} samples (or pad) and pass that input_dim."
            )
        names = tuple(try_canonical_lead_name(n) or n for n in lead_names)
        if len(set(names)) != len(names):
            raise ValueError(f"lead_names {tuple(lead_names)} name a lead twice; give each lead once.")
        self.lead_names: tuple[str, ...] = names
        self.input_dim = int(input_dim)
        self.patch_size = int(patch_size)
        self.n_patches = self.input_dim // self.patch_size
        self.width = int(width)
        self.mask_ratio = float(mask_ratio)
        self.norm_target = bool(norm_target)
        self.eps = float(eps)
        self.eval_mask_seed = int(eval_mask_seed)
        n_pos = self.n_patches + 2  # slot 0 and N + 1 are the SEP tokens
        if kept_patches(self.n_patches, self.mask_ratio, keep_rounding) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {self.n_patches}; lower it")
        self.patch_embed = nn.Linear(self.patch_size, width)
        if patch_norm:
            self.patch_embed = nn.Sequential(nn.LayerNorm(self.patch_size), self.patch_embed, nn.LayerNorm(width))
        self.lead_embed = nn.Parameter(torch.zeros(len(names), width))
        self.sep_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(PreNormBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(decoder_width))
        if pos_embedding == "sincos":  # fixed: buffers outside the state dict, rebuilt at construction
            self.register_buffer("pos_embed", sincos_positions(n_pos, width), persistent=False)
            self.register_buffer("decoder_pos_embed", sincos_positions(n_pos, decoder_width), persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(n_pos, width))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(n_pos, decoder_width))
        self.decoder_lead_embed = nn.Parameter(torch.zeros(len(names), decoder_width))
        self.decoder_blocks = nn.ModuleList(
            PreNormBlock(decoder_width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, self.patch_size)
        self._init_weights()

    @classmethod
    def from_preset(cls, preset: str = "small", lead_names: Sequence[str] = CANONICAL_LEADS, **overrides) -> STMEM:
        """Build a preset of :data:`ST_MEM_PRESETS` (``"paper"`` or ``"small"``); keyword arguments override it.

        Args:
            preset: preset name.
            lead_names: the model's leads.
            **overrides: any constructor argument (e.g. ``input_dim=2500``).

        Returns:
            A new :class:`STMEM`.
        """
        if preset not in ST_MEM_PRESETS:
            raise ValueError(f"unknown ST-MEM preset {preset!r}; use one of {sorted(ST_MEM_PRESETS)}.")
        return cls(lead_names=lead_names, **{**ST_MEM_PRESETS[preset], **overrides})

    def _init_weights(self) -> None:
        learned = [self.lead_embed, self.sep_token, self.mask_token, self.decoder_lead_embed]
        if self.pos_embedding == "learned":
            learned += [self.pos_embed, self.decoder_pos_embed]
        for p in learned:
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ inputs
    def _lead_indices(self, leads: Sequence[str] | None, channels: int) -> list[int]:
        if leads is None:
            if channels != len(self.lead_names):
                raise ValueError(
                    f"x has {channels} channels but the model has {len(self.lead_names)} leads; pass leads=<the "
                    "channel names> so each channel is matched to its lead by name."
                )
            return list(range(channels))
        leads = list(leads)
        if len(leads) != channels:
            raise ValueError(f"leads names {len(leads)} channels but x has {channels}; give one name per channel.")
        index = []
        for name in leads:
            canon = name if name in self.lead_names else try_canonical_lead_name(name)
            if canon not in self.lead_names:
                raise ValueError(
                    f"lead {name!r} is not one of the model's leads {self.lead_names}; drop that channel or build "
                    "the model with it in lead_names."
                )
            index.append(self.lead_names.index(canon))
        if len(set(index)) != len(index):
            raise ValueError(f"leads {leads} name a lead twice; give each lead once.")
        return index

    def _prepare(
        self, x: Tensor, leads: Sequence[str] | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Validate and compact: present leads first per sample, the batch cut to the largest present count.

        Returns:
            ``x_c`` (B, n, T), ``lead_c`` (B, n) model lead indices, ``present_c`` (B, n) bool,
            ``order`` (B, n) input channel of each compacted slot, ``mask`` (B, C) bool.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, leads, time); got shape {tuple(x.shape)}.")
        b, c, t = x.shape
        if t != self.input_dim:
            raise ValueError(
                f"x has {t} samples per lead but the model takes input_dim={self.input_dim}; crop or resample the "
                "signals first (prepdata) or build the model with that input_dim."
            )
        index = torch.tensor(self._lead_indices(leads, c), device=x.device)
        if mask is None:
            mask = torch.ones(b, c, dtype=torch.bool, device=x.device)
        mask = mask.to(device=x.device, dtype=torch.bool)
        if mask.shape != (b, c):
            raise ValueError(f"mask must be (batch, leads) = {(b, c)}; got {tuple(mask.shape)}.")
        counts = mask.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("a sample has no present lead; drop such samples before calling ST-MEM.")
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]
        x_c = x.gather(1, order.unsqueeze(-1).expand(-1, -1, t))
        return x_c, index[order], mask.gather(1, order), order, mask

    def patchify(self, x: Tensor) -> Tensor:
        """Cut signals into patches: (B, C, T) -> (B, C, N, patch_size)."""
        return x.reshape(*x.shape[:-1], self.n_patches, self.patch_size)

    # ------------------------------------------------------------------ encoder
    def _encode(
        self, x_c: Tensor, lead_c: Tensor, present_c: Tensor, keep: Tensor | None, final_norm: bool = True
    ) -> Tensor:
        """Encoder tokens (B, n, K + 2, W) (after the final norm unless not ``final_norm``); ``keep`` (B, n, K)."""
        b, n, _ = x_c.shape
        tokens = self.patch_embed(self.patchify(x_c)) + self.pos_embed[1:-1]  # (B, n, N, W)
        lead = self.lead_embed[lead_c].unsqueeze(2)  # (B, n, 1, W)
        tokens = tokens + lead
        if keep is not None:
            tokens = tokens.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, tokens.shape[-1]))
        start = (self.sep_token + self.pos_embed[0]) + lead
        end = (self.sep_token + self.pos_embed[-1]) + lead
        tokens = torch.cat([start, tokens, end], dim=2)
        per_lead = tokens.shape[2]
        h = tokens.reshape(b, n * per_lead, -1)
        key_mask = None
        if not bool(present_c.all()):
            key_mask = present_c.repeat_interleave(per_lead, dim=1)
        for block in self.blocks:
            h = block(h, key_mask)
        return (self.norm(h) if final_norm else h).reshape(b, n, per_lead, -1)

    def features(self, x: Tensor, leads: Sequence[str] | None = None, mask: Tensor | None = None) -> Tensor:
        """Fine-tuning features: mean of the encoder's patch tokens over the present leads (no masking, no SEP).

        Args:
            x: (B, C, T) signals, T = ``input_dim``.
            leads: C channel names (None = the model's ``lead_names`` in order).
            mask: (B, C) bool, True = present; absent leads are dropped (None = all present).

        Returns:
            (B, width).
        """
        x_c, lead_c, present_c, _, _ = self._prepare(x, leads, mask)
        norm_first = self.pool == "norm_then_mean"
        h = self._encode(x_c, lead_c, present_c, keep=None, final_norm=norm_first)[:, :, 1:-1]  # (B, n, N, W)
        w = present_c.to(h.dtype)[:, :, None, None]
        pooled = (h * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * h.shape[2])
        return pooled if norm_first else self.norm(pooled)

    # ------------------------------------------------------------------ pre-training
    def _mask_generator(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
        if generator is not None or self.training:
            return generator
        return torch.Generator(device=device).manual_seed(self.eval_mask_seed)

    def forward(
        self,
        x: Tensor,
        leads: Sequence[str] | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> STMEMOutput:
        """Mask, encode, decode and score one batch (the pre-training step).

        Args:
            x: (B, C, T) signals, T = ``input_dim``.
            leads: C channel names (None = the model's ``lead_names`` in order).
            mask: (B, C) bool, True = present; absent leads are dropped (None = all present).
            generator: source of the patch masks (on x's device); see the module docstring for the default.

        Returns:
            :class:`STMEMOutput`.
        """
        b, c, _ = x.shape
        x_c, lead_c, present_c, order, mask = self._prepare(x, leads, mask)
        n = x_c.shape[1]
        hidden = random_patch_mask(
            b, c, self.n_patches, self.mask_ratio, self._mask_generator(generator, x.device), x.device,
            self.keep_rounding,
        )  # fmt: skip
        hidden = hidden & mask.unsqueeze(-1)
        hidden_c = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, self.n_patches))
        # kept positions, ascending; absent slots keep an arbitrary (ignored) set of the same size
        n_keep = kept_patches(self.n_patches, self.mask_ratio, self.keep_rounding)
        positions = torch.arange(self.n_patches, device=x.device).expand(b, n, -1)
        keep = torch.sort(torch.where(hidden_c, self.n_patches + positions, positions), dim=-1).values[..., :n_keep]
        h = self.decoder_embed(self._encode(x_c, lead_c, present_c, keep))  # (B, n, K + 2, Wd)
        full = self.mask_token.to(h.dtype).expand(b, n, self.n_patches + 2, -1).clone()
        full[:, :, 0] = h[:, :, 0]
        full[:, :, -1] = h[:, :, -1]
        full = full.scatter(2, (keep + 1).unsqueeze(-1).expand(-1, -1, -1, full.shape[-1]), h[:, :, 1:-1])
        full = full + self.decoder_pos_embed + self.decoder_lead_embed[lead_c].unsqueeze(2)
        rows = full[present_c]  # (R, N + 2, Wd): one sequence per present lead, decoded lead by lead
        for block in self.decoder_blocks:
            rows = block(rows)
        pred_rows = self.decoder_pred(self.decoder_norm(rows))[:, 1:-1]  # (R, N, P)
        pred_c = pred_rows.new_zeros(b, n, self.n_patches, self.patch_size)
        pred_c[present_c] = pred_rows
        recon = pred_c.new_zeros(b, c, self.n_patches, self.patch_size)
        recon = recon.scatter(1, order[:, :, None, None].expand_as(pred_c), pred_c)
        target = self.patchify(torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)))
        loss = masked_patch_mse(recon, target, hidden, normalize=self.norm_target, eps=self.eps)
        return STMEMOutput(loss=loss, recon=recon, target=target, patch_mask=hidden, lead_mask=mask)

    def pretrain_loss(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        leads: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Pre-training objective as a dict (for a training loop that logs named terms).

        Args:
            x: (B, C, T). mask: (B, C) bool, True = present. leads: C channel names. generator: patch-mask source.

        Returns:
            ``{"loss": scalar}``.
        """
        return {"loss": self.forward(x, leads=leads, mask=mask, generator=generator).loss}
