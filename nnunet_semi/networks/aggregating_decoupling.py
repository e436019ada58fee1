"""A&D's three decoders on nnU-Net's encoder (methods.md 2.1; code ``xmed-lab/GenericSSL``, ``DiffVNet``).

nnU-Net's network of the plans (``build_network_architecture``: Plain or ResEnc U-Net) stays the trainer's
``self.network`` and is what ``nnUNetv2_predict`` loads: its input stem and encoder, and its decoder, which
is A&D's prediction decoder D_theta (trained on the fused pseudo-labels, EMA-updated from the other two).
:class:`ADExtras` holds everything else, as one auxiliary module:

- ``decoder_xi`` (D_xi, the denoising decoder) and ``decoder_psi`` (D_psi, the difficulty-aware decoder):
  nnU-Net decoders built like the network's own (a copy of ``network.decoder`` without its reference to
  the encoder, so the encoder's parameters belong to the network alone); parameter names equal D_theta's,
  which is how the EMA matches them;
- ``diffusion_stem``: the denoising path's input stem, nnU-Net's first conv block of the encoder with
  ``image channels + classes`` inputs (the image concatenated with the noisy one-hot label x_t); the image
  path keeps the network's own first conv block. After the stem, the paths share the encoder;
- ``time_embedding`` (sinusoidal 128-d -> Linear 512 -> SiLU -> Linear 512) and ``temb_encoder`` /
  ``temb_decoder``: per stage Linear(512 -> channels) of SiLU(temb), added (broadcast over space) to the
  output of every encoder stage and every D_xi stage on the denoising path only (the released ``TembFusion``
  after the conv stages; on the image path the encoder has no timestep, as released: ``temb=None``).

Forward paths (:func:`encode`, :func:`decode`, :meth:`ADExtras.denoise`):

| path | modules |
|---|---|
| D_xi(x, x_t, t) | diffusion stem -> encoder (+ temb) -> D_xi (+ temb) |
| D_psi(x) | image stem -> encoder -> D_psi |
| D_theta(x) | image stem -> encoder -> D_theta = ``network(x)``, nnU-Net's own forward |

Initialisation: ``init = 'shared'`` starts D_xi and D_psi from D_theta's initial weights (so the three
decoders start in one basin and their weight average, which D_theta's EMA takes, stays a network);
``'independent'`` draws new weights with the network's initialiser, as the released code builds three
separately initialised decoders.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from nnunet_semi.ema import unwrap

TEMB_SINUSOID_DIM = 128
TEMB_DIM = 512


def timestep_embedding(t: torch.Tensor, dim: int = TEMB_SINUSOID_DIM) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer timesteps: [sin(t f_k), cos(t f_k)] with
    f_k = exp(-log(10000) k / (dim/2 - 1)), k = 0 .. dim/2 - 1 (the DDPM form the released code uses)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _is_residual(encoder: nn.Module) -> bool:
    return getattr(encoder, "stem", None) is not None


def first_conv_container(encoder: nn.Module) -> nn.Module:
    """The StackedConvBlocks whose first conv block sees the image: the ResEnc stem, or the first stage
    of a plain encoder."""
    if _is_residual(encoder):
        return encoder.stem
    stage0 = encoder.stages[0]
    if len(stage0) != 1 or not hasattr(stage0[-1], "convs"):
        raise NotImplementedError(f"A&D's diffusion stem needs an encoder whose first stage is one StackedConvBlocks "
                                  f"(nnU-Net's Plain/ResEnc U-Nets); got {type(encoder).__name__} with {stage0}")
    return stage0[-1]


def make_diffusion_stem(encoder: nn.Module, extra_channels: int) -> nn.Module:
    """A copy of the encoder's first conv block whose conv takes ``extra_channels`` more input channels."""
    block = copy.deepcopy(first_conv_container(encoder).convs[0])
    old = block.conv
    conv = type(old)(old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride,
                     padding=old.padding, dilation=old.dilation, bias=old.bias is not None)
    block.conv = conv
    block.all_modules[0] = conv
    return block


def decoder_copy(network: nn.Module) -> nn.Module:
    """A decoder built like ``network.decoder`` that does not hold the encoder as a submodule."""
    decoder = unwrap(network).decoder
    encoder = decoder._modules.pop("encoder", None)
    try:
        dec = copy.deepcopy(decoder)
    finally:
        if encoder is not None:
            decoder._modules["encoder"] = encoder
    return dec


def encode(network: nn.Module, x: torch.Tensor, stem: Optional[nn.Module] = None,
           temb_adds: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """The skips of ``network``'s encoder on ``x``, optionally with ``stem`` in place of its first conv block
    and ``temb_adds[i]`` (B, C_i) added to the output of stage i."""
    enc = unwrap(network).encoder
    if stem is None and temb_adds is None:
        skips = enc(x)
        return list(skips) if isinstance(skips, (list, tuple)) else [skips]

    def run_container(container, inp):
        return container(inp) if stem is None else container.convs[1:](stem(inp))

    skips = []
    if _is_residual(enc):
        x = run_container(enc.stem, x)
        stages = list(enc.stages)
    else:
        x = run_container(first_conv_container(enc), x)
        x = _add(x, temb_adds, 0)
        skips.append(x)
        stages = list(enc.stages)[1:]
    for s in stages:
        x = _add(s(x), temb_adds, len(skips))
        skips.append(x)
    return skips


def _add(x: torch.Tensor, adds: Optional[Sequence[torch.Tensor]], i: int) -> torch.Tensor:
    if adds is None:
        return x
    a = adds[i]
    return x + a.reshape(*a.shape, *([1] * (x.ndim - 2))).to(x.dtype)


def decode(decoder: nn.Module, skips: Sequence[torch.Tensor], temb_adds: Optional[Sequence[torch.Tensor]] = None,
           deep_supervision: Optional[bool] = None):
    """nnU-Net's UNetDecoder forward with ``temb_adds[s]`` added after decoder stage s (lowest resolution
    first); a deep-supervision list (highest resolution first) or the full-resolution tensor, as
    ``deep_supervision`` (default: the decoder's flag)."""
    ds = decoder.deep_supervision if deep_supervision is None else deep_supervision
    lres = skips[-1]
    outs = []
    n = len(decoder.stages)
    for s in range(n):
        x = decoder.transpconvs[s](lres)
        x = decoder.stages[s](torch.cat((x, skips[-(s + 2)]), 1))
        x = _add(x, temb_adds, s)
        if ds:
            outs.append(decoder.seg_layers[s](x))
        elif s == n - 1:
            outs.append(decoder.seg_layers[-1](x))
        lres = x
    outs = outs[::-1]
    return outs if ds else outs[0]


class ADExtras(nn.Module):
    """A&D's modules beside nnU-Net's network (see the module docstring). ``network`` is only read while
    building; the forward methods take it as an argument, so its parameters are never registered here."""

    def __init__(self, network: nn.Module, num_classes: int, init: str = "shared"):
        super().__init__()
        if init not in ("shared", "independent"):
            raise ValueError(f"A&D decoder init must be 'shared' or 'independent', not {init!r}")
        net = unwrap(network)
        self.num_classes = int(num_classes)
        self.decoder_xi = decoder_copy(net)
        self.decoder_psi = decoder_copy(net)
        self.diffusion_stem = make_diffusion_stem(net.encoder, self.num_classes)
        enc_channels = list(net.encoder.output_channels)
        dec_channels = [enc_channels[-(s + 2)] for s in range(len(net.decoder.stages))]
        self.time_embedding = nn.Sequential(nn.Linear(TEMB_SINUSOID_DIM, TEMB_DIM), nn.SiLU(),
                                            nn.Linear(TEMB_DIM, TEMB_DIM))
        self.temb_encoder = nn.ModuleList([nn.Linear(TEMB_DIM, c) for c in enc_channels])
        self.temb_decoder = nn.ModuleList([nn.Linear(TEMB_DIM, c) for c in dec_channels])
        initialise = getattr(net, "initialize", None)
        if initialise is not None:
            self.diffusion_stem.apply(initialise)
            if init == "independent":
                self.decoder_xi.apply(initialise)
                self.decoder_psi.apply(initialise)

    def set_deep_supervision(self, enabled: bool) -> None:
        self.decoder_xi.deep_supervision = enabled
        self.decoder_psi.deep_supervision = enabled

    def temb_adds(self, t: torch.Tensor):
        h = nn.functional.silu(self.time_embedding(timestep_embedding(t)))
        return [lin(h) for lin in self.temb_encoder], [lin(h) for lin in self.temb_decoder]

    def denoise(self, network: nn.Module, image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                deep_supervision: Optional[bool] = None):
        """D_xi(image, x_t, t): the predicted x_0 (clean label logits), a deep-supervision list or a tensor."""
        enc_adds, dec_adds = self.temb_adds(t)
        skips = encode(network, torch.cat((image, x_t.to(image.dtype)), 1), self.diffusion_stem, enc_adds)
        return decode(self.decoder_xi, skips, dec_adds, deep_supervision)

    def difficulty(self, skips: Sequence[torch.Tensor], deep_supervision: Optional[bool] = None):
        """D_psi on the image path's skips."""
        return decode(self.decoder_psi, skips, None, deep_supervision)
