"""CrossMatch (Zhao et al., IEEE JBHI 2024, arXiv 2405.00354; code ``AiEson/CrossMatch``).

One network, no teacher: each step the network labels the weak view of an unlabeled batch (hard argmax,
voxels below the confidence threshold tau left out) and learns from those pseudo-labels on two strong,
CutMix-ed views (image-level perturbation) and on weak/strong channel-dropout streams of every encoder
output (feature-level perturbation, :mod:`nnunet_semi.networks.feature_perturbation`), with
teacher-to-decoder and decoder-to-decoder distillation. ``CrossMatchTrainer_released`` is the released
code's recipe; ``CrossMatchTrainer`` (the default) makes every unsupervised term nnU-Net's loss form on the
pseudo-label and starts it after the base's supervised warm-up. The loss, its scale against nnU-Net's,
the threshold schedules, the variants, the forward passes per step and the DDP/compile notes are in
``docs/crossmatch.md``; the measurements behind the defaults in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semi.losses import masked_dice_loss, masked_mean, pseudo_label
from nnunet_semi.networks.feature_perturbation import add_feature_perturbation, full_resolution
from nnunet_semi.perturbations import apply_cutmix
from nnunet_semi.schedules import sigmoid_rampup
from nnunet_semi.training.base import SemiSupervisedTrainer

LOG_TERMS = ("loss_sup", "loss_s1", "loss_s2", "loss_tkd", "loss_dkd", "pl_confidence", "mask_ratio", "tau")


# ----------------------------------------------------------------------------------------------
# the unsupervised terms (functional core, used by the trainer and the tests)
# ----------------------------------------------------------------------------------------------
DiceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StudentStreams:
    """Full-resolution logits (B, C, *spatial) of one step's student streams: the clean weak view and its
    weak/strong dropout streams, the two clean strong views (already CutMix-ed with the mix source's) and
    the dropout streams of strong view 2."""
    weak: torch.Tensor
    weak_fp_weak: torch.Tensor
    weak_fp_strong: torch.Tensor
    strong1: torch.Tensor
    strong2: torch.Tensor
    strong2_fp_weak: torch.Tensor
    strong2_fp_strong: torch.Tensor


@dataclass
class MixSource:
    """The CutMix source of a step: its no-grad clean and dropout-stream logits (``fp_weak`` / ``fp_strong``
    None: the paper-time code, dropout-stream labels inside box 2 from the same image), the boxes of the two
    strong views and its valid-voxel mask."""
    clean: torch.Tensor
    fp_weak: Optional[torch.Tensor]
    fp_strong: Optional[torch.Tensor]
    box1: torch.Tensor
    box2: torch.Tensor
    valid: Optional[torch.Tensor] = None


def crossmatch_unsupervised_terms(streams: StudentStreams, mix: MixSource, tau: float, dice: DiceFn,
                                  valid: Optional[torch.Tensor] = None, temperature: float = 1.0
                                  ) -> Dict[str, torch.Tensor]:
    """CrossMatch's unsupervised terms. ``dice(logits, target, keep)`` is the unsupervised loss of one
    term; ``keep`` = confidence >= tau (and inside the image when ``valid`` and ``mix.valid`` are given).
    Pseudo-labels come from :func:`~nnunet_semi.losses.pseudo_label`, so no gradient flows into the clean
    weak view or the mix source through them.

    Returns loss_s1, loss_s2, loss_tkd (mean of 4), loss_dkd (mean of 2), pl_confidence and
    mask_ratio (mean confidence and kept fraction of the clean weak-view pseudo-label).
    """
    p_w, p_w_weak, p_w_strong = streams.weak, streams.weak_fp_weak, streams.weak_fp_strong
    p_s1, p_s2, p_s2_weak, p_s2_strong = streams.strong1, streams.strong2, streams.strong2_fp_weak, \
        streams.strong2_fp_strong
    box1, box2, valid_mix = mix.box1, mix.box2, mix.valid
    mix_weak, mix_strong = mix.fp_weak, mix.fp_strong
    y_w, c_w = pseudo_label(p_w, temperature)
    y_ww, c_ww = pseudo_label(p_w_weak, temperature)
    y_ws, c_ws = pseudo_label(p_w_strong, temperature)
    y_m, c_m = pseudo_label(mix.clean, temperature)

    v1 = v2 = valid
    if valid is not None and valid_mix is not None:
        v1, v2 = apply_cutmix(valid, valid_mix, box1), apply_cutmix(valid, valid_mix, box2)

    def keep(conf: torch.Tensor, v: Optional[torch.Tensor]) -> torch.Tensor:
        k = conf >= tau
        return k if v is None else k & v

    # clean weak-view labels, CutMix-ed with the mix source's clean labels (the same boxes as the images)
    y1, c1 = apply_cutmix(y_w, y_m, box1), apply_cutmix(c_w, c_m, box1)
    y2, c2 = apply_cutmix(y_w, y_m, box2), apply_cutmix(c_w, c_m, box2)
    # dropout-stream labels of the weak view, CutMix-ed with the mix source's dropout-stream labels
    if mix_weak is not None and mix_strong is not None:
        y_mw, c_mw = pseudo_label(mix_weak, temperature)
        y_ms, c_ms = pseudo_label(mix_strong, temperature)
        y2w, c2w = apply_cutmix(y_ww, y_mw, box2), apply_cutmix(c_ww, c_mw, box2)
        y2s, c2s = apply_cutmix(y_ws, y_ms, box2), apply_cutmix(c_ws, c_ms, box2)
    else:
        y2w, c2w, y2s, c2s = y_ww, c_ww, y_ws, c_ws

    k_w, k1, k2 = keep(c_w, valid), keep(c1, v1), keep(c2, v2)
    loss_s1 = dice(p_s1, y1, k1)
    loss_s2 = dice(p_s2, y2, k2)
    loss_tkd = (dice(p_w_weak, y_w, k_w) + dice(p_w_strong, y_w, k_w)
                + dice(p_s2_weak, y2, k2) + dice(p_s2_strong, y2, k2)) / 4.0
    loss_dkd = (dice(p_s2_weak, y2w, keep(c2w, v2)) + dice(p_s2_strong, y2s, keep(c2s, v2))) / 2.0
    return {"loss_s1": loss_s1, "loss_s2": loss_s2, "loss_tkd": loss_tkd, "loss_dkd": loss_dkd,
            "pl_confidence": masked_mean(c_w, valid).detach(),
            "mask_ratio": masked_mean(c_w >= tau, valid).detach()}


def annealed_tau(step: int, length: float, tau0: float, scale: float = math.log(2)) -> float:
    """The LA code's threshold: raw tau0 at step 0, then (tau0 + (1 - tau0) sigmoid_rampup(step - 1,
    length)) * scale (the code updates it after each iteration)."""
    if step <= 0:
        return float(tau0)
    return float((tau0 + (1.0 - tau0) * sigmoid_rampup(step - 1, length)) * scale)


# ----------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------
class CrossMatchTrainer(SemiSupervisedTrainer):
    """CrossMatch inside nnU-Net (this plugin's default; ``CrossMatchTrainer_released`` is the released
    recipe): every unsupervised term is nnU-Net's loss form on the pseudo-label, CE + foreground Dice over
    the classes present in the kept pseudo-label (the released code: all-class or foreground Dice, no CE),
    after a supervised warm-up (at least 250 iterations and nnU-Net's EMA pseudo Dice >= 0.5), then a
    sigmoid ramp over 500 iterations (the released code: full weight from step 0). See
    benchmarks/RESULTS.md for the measurements behind these choices."""
    benchmark_default = True
    # ---- recipe for nnU-Net (the released values are in CrossMatchTrainer_released) ---------
    warmup_iters: int = 250
    warmup_pseudo_dice: Optional[float] = 0.5
    rampup: str = "sigmoid"
    rampup_iters: Optional[int] = 500
    num_strong_views = 2
    unlabeled_batches_per_step = 2
    # ---- feature perturbation (the code's pert_gap 0.5: 0.5 -/+ 0.25) ----------------------
    fp_dropout_weak: float = 0.25
    fp_dropout_strong: float = 0.75
    # ---- CutMix from the second unlabeled batch (box area and shape: the base's cutmix_area / _ratio_min) ---
    cutmix_p = 0.5
    #: dropout-stream pseudo-labels inside the CutMix box from the mix source's dropout streams
    #: (HEAD); False = the paper-time code (from the same image) and no dropout pass on the mix source
    fp_labels_from_mix_source: bool = True
    # ---- pseudo-labels ----------------------------------------------------------------------
    #: confidence threshold ('fixed') or tau0 ('annealed')
    tau: float = 0.95
    #: 'fixed' (ACDC code) or 'annealed' (LA code, see annealed_tau)
    tau_schedule: str = "fixed"
    #: annealing length as a fraction of all training steps (LA code: 17000 / 14000 iterations)
    tau_anneal_fraction: float = 17000 / 14000
    tau_anneal_scale: float = math.log(2)
    #: divides the logits before the pseudo-label softmax (code default 1)
    temperature: float = 1.0
    #: exclude voxels outside the image (padding) from the unsupervised Dice sums
    mask_padding: bool = True
    # ---- losses -----------------------------------------------------------------------------
    eta: float = 0.3
    #: factor on nnU-Net's loss (CE + Dice): 0.5 = the code's L_sup = (CE + Dice) / 2
    sup_loss_scale: float = 0.5
    weight_s1: float = 0.25
    weight_s2: float = 0.25
    #: weight of L_kd; None = 0.5 for 2D configurations (ACDC code), 1.0 for 3D (LA code)
    weight_kd: Optional[float] = None
    loss_divisor: float = 2.0
    #: multiply the total by loss_divisor / sup_loss_scale (supervised term = nnU-Net's loss, ratios kept)
    keep_nnunet_loss_scale: bool = True
    #: None = all classes averaged if more than 2 classes (ACDC code), foreground only if binary (LA code)
    dice_include_background: Optional[bool] = False
    #: None = 1e-4 if more than 2 classes (ACDC code), 1e-5 if binary (LA code)
    dice_smooth: Optional[float] = None
    dice_squared_denominator: bool = True
    #: average the unsupervised Dice over the classes present in the kept pseudo-label only (not in the code)
    dice_skip_absent_classes: bool = True
    #: weight of a masked CE added to every unsupervised Dice term (not in the code, which has no CE there)
    unsup_ce_weight: float = 1.0
    #: scale the unsupervised terms by nnU-Net's deep-supervision weight of the full-resolution output, so
    #: that the full-resolution supervised : unsupervised ratio is the released code's (which has no DS)
    match_full_resolution_ratio: bool = False
    # ---- passes -----------------------------------------------------------------------------
    #: one grad forward on [x; u_s1; u_w; u_s2]; False = the code's two ([x; u_w], [u_s1; u_s2])
    single_student_pass: bool = True

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        parent = super(CrossMatchTrainer, CrossMatchTrainer).build_network_architecture  # a staticmethod
        network = parent(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                         enable_deep_supervision)
        return add_feature_perturbation(network)

    def initialize(self):
        super().initialize()
        self.configure_crossmatch(self.label_manager.num_segmentation_heads, len(self.configuration_manager.patch_size))
        self.print_to_log_file(f"CrossMatch: {self.num_classes_u} classes, Dice "
                               f"{'with' if self.dice_bg else 'without'} background, smooth {self.dice_eps}, "
                               f"L_kd weight {self.kd_weight}, tau {self.tau_schedule} {self.tau}")

    def configure_crossmatch(self, num_classes: int, ndim: int) -> None:
        """Resolve the ``None`` (automatic) settings for ``num_classes`` outputs and a 2D/3D patch."""
        if self.tau_schedule not in ("fixed", "annealed"):
            raise ValueError(f"{type(self).__name__}.tau_schedule must be 'fixed' or 'annealed'")
        self.num_classes_u = int(num_classes)
        multi = self.num_classes_u > 2
        self.dice_bg = multi if self.dice_include_background is None else bool(self.dice_include_background)
        self.dice_eps = (1e-4 if multi else 1e-5) if self.dice_smooth is None else float(self.dice_smooth)
        self.kd_weight = (0.5 if ndim == 2 else 1.0) if self.weight_kd is None else float(self.weight_kd)

    def tau_now(self) -> float:
        if self.tau_schedule == "annealed":
            return annealed_tau(self.global_step, self.tau_anneal_fraction * self.total_steps, self.tau,
                                self.tau_anneal_scale)
        return float(self.tau)

    def unsup_dice(self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """One unsupervised term: the masked Dice, plus ``unsup_ce_weight`` x masked CE when that is set."""
        log_p = torch.log_softmax(logits.float(), 1)     # one normalisation serves the Dice and the CE
        loss = masked_dice_loss(log_p.exp(), target, keep, include_background=self.dice_bg,
                                smooth=self.dice_eps, squared_denominator=self.dice_squared_denominator,
                                batch_dice=True, skip_absent_classes=self.dice_skip_absent_classes)
        if self.unsup_ce_weight:
            ce = F.nll_loss(log_p, target.long(), reduction="none")
            loss = loss + self.unsup_ce_weight * masked_mean(ce, keep)
        return loss

    def full_resolution_weight(self) -> float:
        """nnU-Net's deep-supervision weight of the full-resolution output (1 without deep supervision)."""
        weights = getattr(self.loss, "weight_factors", None)
        if not self.enable_deep_supervision or weights is None:
            return 1.0
        return float(weights[0]) / float(sum(weights))

    def mix_source_on_every_sample(self) -> bool:
        """Under DDP with batch norm (SyncBatchNorm) every rank must run the same collectives, so the mix
        source is run on all its samples whatever CutMix boxes the rank drew (with instance norm, nnU-Net's
        default, a rank may skip the samples without a box)."""
        if not getattr(self, "is_ddp", False):
            return False
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.network.modules())

    @torch.no_grad()
    def mix_source_predictions(self, m_weak: torch.Tensor, box1: torch.Tensor, box2: torch.Tensor, fp: dict):
        """The mix source's full-resolution logits (B_u, C, ...): clean, and (HEAD) its weak- and
        strong-dropout streams, from one no-grad encoder pass and one decoder call. They are only ever
        read inside a CutMix box, so only the samples that got a box are run (the clean stream for a box
        in either strong view, the dropout streams for one in view 2, the only view they label); the
        other samples' rows stay 0. Expected cost with cutmix_p 0.5: 3/4 of the clean and 1/2 of the
        dropout-stream samples."""
        with_fp = self.fp_labels_from_mix_source
        if self.mix_source_on_every_sample():
            need_any, need_fp = [True] * m_weak.shape[0], [with_fp] * m_weak.shape[0]
        else:
            need_any = (box1.flatten(1).any(1) | box2.flatten(1).any(1)).tolist()
            need_fp = box2.flatten(1).any(1).tolist() if with_fp else [False] * len(need_any)
        clean_only = [i for i, (a, f) in enumerate(zip(need_any, need_fp)) if a and not f]
        fp_rows = [i for i, f in enumerate(need_fp) if f]
        order = clean_only + fp_rows   # the samples with dropout streams last (fp_from)
        shape = (m_weak.shape[0], self.num_classes_u) + tuple(m_weak.shape[2:])
        mix = m_weak.new_zeros(shape)
        mix_weak = mix_strong = None
        if with_fp:
            mix_weak, mix_strong = m_weak.new_zeros(shape), m_weak.new_zeros(shape)
        if not order:
            return mix, mix_weak, mix_strong
        idx = torch.as_tensor(order, device=m_weak.device)
        x = m_weak.index_select(0, idx)
        if fp_rows:
            clean, weak, strong = self.network(x, fp_from=len(clean_only), **fp)
            rows = idx[len(clean_only):]
            mix_weak[rows], mix_strong[rows] = weak.to(mix.dtype), strong.to(mix.dtype)
        else:
            clean = self.network(x)
        mix[idx] = full_resolution(clean).to(mix.dtype)
        return mix, mix_weak, mix_strong

    def scaled_total(self, loss: torch.Tensor) -> torch.Tensor:
        """(sup_loss_scale x nnU-Net's loss + weighted unsupervised terms) / loss_divisor, as released; times
        loss_divisor / sup_loss_scale with keep_nnunet_loss_scale (the supervised term is then nnU-Net's loss)."""
        total = loss / self.loss_divisor
        return total * (self.loss_divisor / self.sup_loss_scale) if self.keep_nnunet_loss_scale else total

    def supervised_loss(self, data, target):
        """A warm-up step (gate closed, no unlabeled batch drawn): the total of :meth:`compute_loss` at
        unsupervised weight 0, so the clipping sees the same scale."""
        loss_sup = self.sup_loss_scale * self.loss(self.network(data), target)
        return self.scaled_total(loss_sup), {"loss_sup": loss_sup.detach()}

    def compute_loss(self, data, target, unlabeled):
        u, m = unlabeled[0], unlabeled[1]
        bl, bu = data.shape[0], u.weak.shape[0]
        fp = {"p_weak": self.fp_dropout_weak, "p_strong": self.fp_dropout_strong}
        box1, box2 = (self.cutmix_boxes(bu, u.weak.shape[2:]) for _ in range(2))   # on the host
        mix, mix_weak, mix_strong = self.mix_source_predictions(m.weak, box1, box2, fp)
        box1, box2 = box1.to(u.weak.device, non_blocking=True), box2.to(u.weak.device, non_blocking=True)
        u_s1 = apply_cutmix(u.strong[0], m.strong[0], box1)
        u_s2 = apply_cutmix(u.strong[1], m.strong[1], box2)

        if self.single_student_pass:  # the clean weak view only makes pseudo-labels: decoded without grad
            clean, p_weak, p_strong = self.network(torch.cat((data, u_s1, u_s2, u.weak)), fp_from=bl + bu,
                                                   clean_no_grad=bu, **fp)
            out_l = [o[:bl] for o in clean] if isinstance(clean, (list, tuple)) else clean[:bl]
            p_s1, p_s2, p_w = full_resolution(clean)[bl:].split(bu)
            p_s2_weak, p_w_weak = p_weak.split(bu)
            p_s2_strong, p_w_strong = p_strong.split(bu)
        else:
            clean_a, p_w_weak, p_w_strong = self.network(torch.cat((data, u.weak)), fp_from=bl, clean_no_grad=bu,
                                                         **fp)
            clean_b, p_s2_weak, p_s2_strong = self.network(torch.cat((u_s1, u_s2)), fp_from=bu, **fp)
            out_l = [o[:bl] for o in clean_a] if isinstance(clean_a, (list, tuple)) else clean_a[:bl]
            p_w = full_resolution(clean_a)[bl:]
            p_s1, p_s2 = full_resolution(clean_b).split(bu)

        loss_sup = self.sup_loss_scale * self.loss(out_l, target)
        tau = self.tau_now()
        valid, valid_mix = (u.valid, m.valid) if self.mask_padding else (None, None)
        terms = crossmatch_unsupervised_terms(
            StudentStreams(p_w, p_w_weak, p_w_strong, p_s1, p_s2, p_s2_weak, p_s2_strong),
            MixSource(mix, mix_weak, mix_strong, box1, box2, valid_mix), tau, self.unsup_dice, valid,
            self.temperature)
        loss_kd = (1.0 - self.eta) * terms["loss_tkd"] + self.eta * terms["loss_dkd"]
        loss_u = self.weight_s1 * terms["loss_s1"] + self.weight_s2 * terms["loss_s2"] + self.kd_weight * loss_kd
        if self.match_full_resolution_ratio:
            loss_u = loss_u * self.full_resolution_weight()
        total = self.scaled_total(loss_sup + self.unsup_weight_now() * loss_u)
        logged = {"loss_sup": loss_sup.detach(), **{k: v.detach() for k, v in terms.items()},
                  "tau": tau}
        return total, {k: logged[k] for k in LOG_TERMS}


class CrossMatchTrainer_svda(CrossMatchTrainer):
    """The default recipe with A&D's SVDA in place of nnU-Net's augmentation: the whole SVDA on the labeled batch,
    and as each strong view SVDA's intensity operations (3 of blur, brightness, contrast, gamma, p 0.7; then
    CutMix as in the default), which keep the strong views pixel-aligned with the weak view the pseudo-labels come
    from. Its control is ``SupervisedBaselineTrainer_svda`` (benchmarks/RESULTS.md)."""
    augmentation = "svda"


class CrossMatchTrainer_released(CrossMatchTrainer):
    """The released code at HEAD: Dice-only unsupervised terms (all classes with more than two, foreground
    for binary problems), full weight from step 0, no warm-up (the plugin's default up to version 0.1)."""
    warmup_iters = 0
    warmup_pseudo_dice = None
    rampup_iters = None
    rampup_fraction = 0.0
    dice_include_background = None
    dice_skip_absent_classes = False
    unsup_ce_weight = 0.0


class CrossMatchTrainer_paper(CrossMatchTrainer_released):
    """The paper-time code (``d00de40``): (L_sup + 0.5 L_s1 + 0.5 L_s2 + L_kd) / 3, tau 0.85 (fixed;
    the LA code annealed it, see ``CrossMatchTrainer_paperAnnealedTau``). Keeps HEAD's CutMix fix;
    set ``fp_labels_from_mix_source = False`` for the paper-time bug as well."""
    tau = 0.85
    weight_s1 = 0.5
    weight_s2 = 0.5
    weight_kd = 1.0
    loss_divisor = 3.0


class CrossMatchTrainer_paperAnnealedTau(CrossMatchTrainer_paper):
    """Paper-time LA recipe: tau0 0.85 annealed over 17000 of 9000 iterations."""
    tau_schedule = "annealed"
    tau_anneal_fraction = 17000 / 9000


class CrossMatchTrainer_annealedTau(CrossMatchTrainer_released):
    """HEAD's LA threshold: tau0 0.75 annealed (x ln 2) over 17000 of 14000 iterations."""
    tau = 0.75
    tau_schedule = "annealed"


class CrossMatchTrainer_rampUp(CrossMatchTrainer_released):
    """Not in the released code: the unsupervised terms ramp in with the base's sigmoid ramp-up,
    exp(-5 (1 - t / T)^2) with T = ``rampup_fraction`` x all training steps (factor 0.0067 at step 0,
    0.29 at T/2, 1 from T on). Short CPU budgets start inside nnU-Net's all-background phase, where the
    released code's full-weight Dice terms on foreground-free pseudo-labels can hold a run there (see
    benchmarks/RESULTS.md); the ramp lets the labeled cases produce foreground first."""
    rampup = "sigmoid"
    rampup_fraction = 0.5


class CrossMatchTrainer_presentClassDice(CrossMatchTrainer_released):
    """Not in the released code: each unsupervised Dice term averages only over the classes present in its
    (kept) pseudo-label batch. In the code's Dice (squared denominator, smooth 1e-4 or 1e-5) a class absent
    from the pseudo-label pulls that class's probabilities towards 0 with a gradient of about 2 p / smooth
    once their squared sum is near the smooth; early pseudo-labels without foreground can thus hold a run in
    nnU-Net's all-background phase (measured on Hippocampus: a whole 1000-iteration run, see benchmarks/RESULTS.md)."""
    dice_skip_absent_classes = True
