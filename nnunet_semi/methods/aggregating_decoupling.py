"""A&D, Aggregating & Decoupling (Wang & Li, NeurIPS 2023; code ``xmed-lab/GenericSSL``; methods.md section 2).

One framework for semi-supervised (SSL), class-imbalanced semi-supervised (ImbSSL), unsupervised domain
adaptation (UDA) and semi-supervised domain generalisation (SemiDG) segmentation. nnU-Net's encoder of the
plans is shared by three decoders built like nnU-Net's (:mod:`nnunet_semi.networks.aggregating_decoupling`):

- D_xi, the denoising decoder: diffusion stem on [image, x_t] and a timestep embedding; predicts the clean
  label x_0, trained with nnU-Net's DC+CE (deep supervision) on the labeled batch: L_deno;
- D_psi, the difficulty-aware decoder: trained on the labeled batch with the difficulty-aware class weights
  (:class:`~nnunet_semi.difficulty.DifficultyWeights`, from D_xi's hard labeled Dice) in CE and Dice: L_diff;
- D_theta, the prediction decoder (nnU-Net's own ``network.decoder``): trained on the unlabeled batch with
  the fused pseudo-labels (L_u) and, after every iteration, EMA-updated from (D_xi + D_psi) / 2 (decay 0.99,
  matched by parameter name; :meth:`ema_rules`).

Pseudo-labels (no gradient): 10-step deterministic DDIM with D_xi from Gaussian noise (x_0 clamped to
[-1, 1]; :func:`~nnunet_semi.diffusion.ddim_sample`), fused with D_psi's softmax by Reparameterize & Smooth
(Gumbel-softmax of x_0, 3x3(x3) Gaussian, argmax; :func:`~nnunet_semi.losses.reparameterize_and_smooth`).
Loss L_deno + L_diff + mu L_u, mu the base's unsupervised weight (warm-up gate and ramp).

What ``nnUNetv2_predict`` loads: stem + encoder + D_theta, i.e. nnU-Net's own network of
``build_network_architecture`` (the released code predicts with D_theta only). D_xi, D_psi, the diffusion
stem, the timestep layers (auxiliary module ``'ad'``, with their optimizer) and the difficulty statistics are
checkpoint state restored by ``--c``. Deep supervision: the three decoders each have nnU-Net's
deep-supervision heads and L_deno, L_diff and L_u all use nnU-Net's deep-supervision weights (pseudo-labels
downsampled by nearest neighbour); DDIM uses D_xi's full-resolution output only. The released network has no
deep supervision.

Recipes (class attributes; a variant is a subclass):

| | ``AggregatingDecouplingTrainer`` (default) | ``AggregatingDecouplingTrainer_released`` |
|---|---|---|
| augmentation | nnU-Net's; the unlabeled batch: nnU-Net's geometry + the plugin's strong intensity view | SVDA (3 of 6 ops, p 0.7) on both streams, no mirroring |
| pseudo-labels from | the weak view (D_theta trained on the pixel-aligned strong view) | the same SVDA view D_theta trains on |
| decoders start | from one initialisation (D_theta's weights) | independently initialised |
| D_theta's losses | L_u and nnU-Net's DC+CE on the labeled batch | L_u only |
| difficulty weights | divided by their mean | as computed (they shrink as the classes are learned) |
| mu | 1, after a supervised warm-up (>= 250 iterations and EMA pseudo Dice >= 0.5), sigmoid ramp over 500 | mu_max 10, sigmoid ramp over the whole run |
| optimiser | nnU-Net's (SGD 0.99 Nesterov, poly from 1e-2, wd 3e-5) | SGD 0.9 Nesterov, lr 1e-2 poly, wd 3e-5 |

Two parts of the default are not in the released code, chosen on the validation group (benchmarks/RESULTS.md):
the difficulty weights divided by their mean (``difficulty_normalize``; raw, they shrink as the classes are
learned and D_psi's labeled loss fades) and D_theta also trained on the labeled batch with nnU-Net's DC+CE
(``theta_supervised``; in the released code D_theta sees labels only through the EMA and the pseudo-labels).
``_normDifficulty`` drops the second, ``_thetaUnlabeled`` both (the plugin's earlier default).

Both optimise the network (stem, encoder, D_theta) with nnU-Net's optimiser and the auxiliary modules with a
second optimiser of the same recipe; each is clipped at 12 (the released code does not clip). Under DDP the
method's forward calls nnU-Net's modules directly (three paths through one encoder), so the gradients are
averaged over ranks explicitly (the base's :meth:`all_reduce_gradients`) before both steps.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_semi.difficulty import DifficultyWeights
from nnunet_semi.diffusion import ddim_sample, encode_label, linear_alphas_cumprod, q_sample
from nnunet_semi.ema import unwrap
from nnunet_semi.losses import ClassWeightedDiceCE, deep_supervision_targets, reparameterize_and_smooth
from nnunet_semi.networks.aggregating_decoupling import ADExtras, decode, encode
from nnunet_semi.networks.feature_perturbation import full_resolution, split_batch
from nnunet_semi.training.auxiliary import AuxiliaryModule
from nnunet_semi.training.base import SemiSupervisedTrainer

AUX = "ad"


class AggregatingDecouplingTrainer(SemiSupervisedTrainer):
    benchmark_default = True
    num_strong_views = 1
    unlabeled_batches_per_step = 1
    # ``augmentation`` (the plugin's, :class:`~nnunet_semi.training.plugin.PluginTrainerMixin`): 'nnunet'
    # (nnU-Net's training augmentation, the plugin's strong view on the unlabeled batch) or 'svda' (A&D's
    # strong augmentation on both streams)
    #: 'weak' (pseudo-labels from the weak view, D_theta trained on the strong view) or 'same' (one view)
    pseudo_label_view: str = "weak"
    #: 'shared' (D_xi and D_psi start from D_theta's initial weights) or 'independent' (as released)
    decoder_init: str = "shared"
    # ---- diffusion (methods.md 2.2) -------------------------------------------------------------------
    diffusion_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sample_steps: int = 10
    gumbel_tau: float = 1.0
    # ---- decoupling and difficulty (2.5, 2.6) ---------------------------------------------------------
    #: D_theta <- decay D_theta + (1 - decay) (D_xi + D_psi) / 2 after every iteration
    theta_ema_decay: float = 0.99
    difficulty_momentum: float = (50 - 1) / 50
    #: divide the difficulty-aware weights by their mean before they weight D_psi's loss (their class ratios
    #: kept, their overall scale, which shrinks as the classes are learned, not); False = as released
    difficulty_normalize: bool = True
    #: also train D_theta on the labeled batch with nnU-Net's DC+CE (L_sup; not in the released code, where
    #: D_theta sees labels only through the EMA of D_xi and D_psi and through the pseudo-labels)
    theta_supervised: bool = True
    # ---- mu (the base's unsupervised weight schedule) -------------------------------------------------
    unsup_weight: float = 1.0
    rampup: str = "sigmoid"
    rampup_iters: Optional[int] = 500
    warmup_iters: int = 250
    warmup_pseudo_dice: Optional[float] = 0.5
    # ---- optimisers -----------------------------------------------------------------------------------
    #: 'nnunet' (SGD 0.99 Nesterov, poly) or 'released' (SGD 0.9 Nesterov, poly, lr released_lr)
    optimizer_recipe: str = "nnunet"
    released_lr: float = 1e-2
    released_weight_decay: float = 3e-5
    aux_grad_clip: Optional[float] = 12.0
    #: ``nnUNetv2_semi_export -n psi``: stem + encoder + D_psi as a plain nnU-Net network (the student is D_theta;
    #: D_xi needs the diffusion input and is not a plain network)
    partial_exports = {"psi": (AUX, "decoder_psi.", "decoder.")}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.difficulty: Optional[DifficultyWeights] = None
        self.alphas_cumprod = linear_alphas_cumprod(self.diffusion_steps, self.beta_start, self.beta_end)
        self.weighted_loss = None
        self._weighted_dc_ce: Optional[ClassWeightedDiceCE] = None

    # ---- set-up ---------------------------------------------------------------------------------------
    def initialize(self):
        name = type(self).__name__
        for attr, allowed in (("pseudo_label_view", ("weak", "same")),
                              ("decoder_init", ("shared", "independent")),
                              ("optimizer_recipe", ("nnunet", "released"))):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"{name}.{attr} = {getattr(self, attr)!r}: use one of {allowed}")
        if self.pseudo_label_view == "weak" and self.num_strong_views < 1:
            raise ValueError(f"{name}: pseudo_label_view 'weak' needs num_strong_views >= 1 (the view D_theta "
                             f"trains on); use pseudo_label_view = 'same' otherwise")
        if self.label_manager.ignore_label is not None:
            raise NotImplementedError(f"{name}: datasets with an ignore label are not supported (the difficulty "
                                      f"weights and the diffusion label encoding need every voxel labeled)")
        super().initialize()
        self.difficulty = DifficultyWeights(self.label_manager.num_segmentation_heads, self.difficulty_momentum)
        self._weighted_dc_ce = ClassWeightedDiceCE(batch_dice=self.configuration_manager.batch_dice)
        self.weighted_loss = (DeepSupervisionWrapper(self._weighted_dc_ce, self.loss.weight_factors)
                              if self.enable_deep_supervision else self._weighted_dc_ce)
        self.print_to_log_file(f"A&D: augmentation {self.augmentation}, pseudo-labels from the "
                               f"{self.pseudo_label_view} view, decoders {self.decoder_init}, optimizers "
                               f"{self.optimizer_recipe}, {self.sample_steps} DDIM steps")

    def strong_views_must_align(self) -> bool:
        """Pseudo-labels from the weak view need an aligned strong view (with SVDA: its intensity operations
        only); from the view D_theta trains on ('same', as released) they do not (the whole SVDA)."""
        return self.pseudo_label_view == "weak"

    def make_optimizer(self, parameters):
        if self.optimizer_recipe == "released":
            opt = torch.optim.SGD(parameters, self.released_lr, momentum=0.9, nesterov=True,
                                  weight_decay=self.released_weight_decay)
            return opt, PolyLRScheduler(opt, self.released_lr, self.num_epochs)
        return self.nnunet_optimizer(parameters)

    def configure_optimizers(self):
        return self.make_optimizer(self.network.parameters())

    def build_auxiliary_modules(self) -> Dict[str, AuxiliaryModule]:
        extras = ADExtras(self.network, self.label_manager.num_segmentation_heads, self.decoder_init).to(self.device)
        opt, sched = self.make_optimizer(extras.parameters())
        return {AUX: AuxiliaryModule(extras, trainable=True, optimizer=opt, lr_scheduler=sched,
                                     grad_clip=self.aux_grad_clip)}

    def ema_rules(self):
        return super().ema_rules() + [("network.decoder", (f"{AUX}.decoder_xi", f"{AUX}.decoder_psi"),
                                       self.theta_ema_decay, False, ("encoder.",))]

    # ---- the step -------------------------------------------------------------------------------------
    @property
    def extras(self) -> ADExtras:
        return self.aux[AUX].module

    def denoise_fn(self, image: torch.Tensor):
        """x_0 = D_xi(image, x_t, t) at full resolution, as :func:`ddim_sample` calls it."""
        return lambda x_t, t: self.extras.denoise(self.network, image, x_t, t, deep_supervision=False).float()

    @torch.no_grad()
    def pseudo_labels(self, image: torch.Tensor, skips_u: Optional[List[torch.Tensor]] = None
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """R&S fusion of D_xi's DDIM sample and D_psi's softmax on ``image`` (D_psi reads ``skips_u`` when
        given: the image path's encoder output of the same image). No gradient."""
        k = self.label_manager.num_segmentation_heads
        x0 = ddim_sample(self.denoise_fn(image), (image.shape[0], k, *image.shape[2:]), self.alphas_cumprod,
                         self.sample_steps, device=image.device)
        if skips_u is None:
            skips_u = encode(self.network, image)
        psi = self.extras.difficulty([s.detach() for s in skips_u], deep_supervision=False).float()
        label = reparameterize_and_smooth(x0, psi, tau=self.gumbel_tau)
        stats = {"pl_agreement": (x0.argmax(1) == psi.argmax(1)).float().mean(),
                 "pl_foreground": (label > 0).float().mean()}
        return label, stats

    def method_step(self, data, target, unlabeled):
        aux = self.aux[AUX]
        ds = self.enable_deep_supervision
        net = unwrap(self.network)
        self.optimizer.zero_grad(set_to_none=True)
        aux.optimizer.zero_grad(set_to_none=True)
        y = full_resolution(target)[:, 0].long()
        k = self.label_manager.num_segmentation_heads
        mu = self.unsup_weight_now()   # > 0 only once the gate is open, when the unlabeled batch is drawn
        if mu > 0:
            u = unlabeled[0]
            x_u = u.strong[0] if self.num_strong_views else u.weak
            x_pl = u.weak if self.pseudo_label_view == "weak" else x_u
        with self.autocast():
            # D_xi on the labeled batch: noisy one-hot label at a random timestep
            t = torch.randint(0, self.diffusion_steps, (data.shape[0],), device=data.device)
            x_t = q_sample(encode_label(F.one_hot(y, k).movedim(-1, 1)), t, self.alphas_cumprod)
            p_xi = self.extras.denoise(self.network, data, x_t, t, deep_supervision=ds)
            loss_deno = self.loss(p_xi, target)
            # image path: one encoder pass on [labeled; unlabeled]
            n_l = data.shape[0]
            skips = encode(self.network, torch.cat((data, x_u)) if mu > 0 else data)
            p_psi = self.extras.difficulty([s[:n_l] for s in skips], deep_supervision=ds)
            w = self.difficulty.update(full_resolution(p_xi).detach().argmax(1), y)
            self._weighted_dc_ce.class_weights = (w / w.mean() if self.difficulty_normalize else w).float()
            loss_diff = self.weighted_loss(p_psi, target)
            total = loss_deno + loss_diff
            terms = {"loss_deno": loss_deno.detach(), "loss_diff": loss_diff.detach()}
            # D_theta: one decoder pass on the labeled (theta_supervised) and / or unlabeled part of the batch
            p_theta_l, p_theta = split_decode(net.decoder, skips, n_l, self.theta_supervised, mu > 0, ds)
            if p_theta_l is not None:
                loss_sup = self.loss(p_theta_l, target)
                total = total + loss_sup
                terms["loss_sup"] = loss_sup.detach()
            if mu > 0:
                skips_u = [s[n_l:] for s in skips]
                y_u, stats = self.pseudo_labels(x_pl, skips_u if x_pl is x_u else None)
                pl_target = deep_supervision_targets(p_theta, y_u) if ds else y_u[:, None].float()
                loss_u = self.loss(p_theta, pl_target)
                total = total + mu * loss_u
                terms.update(loss_unsup=loss_u.detach(), **stats)
        terms.update({f"difficulty_w{c}": w[c].float() for c in range(k)})
        self.backward(total)
        self.all_reduce_gradients(list(self.network.parameters()) + list(aux.module.parameters()))
        self.step_optimizer(self.optimizer, self.network.parameters())
        self.step_optimizer(aux.optimizer, aux.module.parameters(), aux.grad_clip, name=AUX)
        self.update_grad_scaler()
        return total.detach(), terms

    # ---- checkpoint -----------------------------------------------------------------------------------
    def semi_state_dict(self) -> dict:
        state = super().semi_state_dict()
        if self.difficulty is not None:
            state["difficulty"] = self.difficulty.state_dict()
        return state

    def load_semi_state_dict(self, state: dict) -> None:
        super().load_semi_state_dict(state)
        if state.get("difficulty") is not None and self.difficulty is not None:
            self.difficulty.load_state_dict(state["difficulty"])


def split_decode(decoder, skips: List[torch.Tensor], n_l: int, labeled: bool, unlabeled: bool, ds: bool):
    """``decoder`` on the first ``n_l`` (``labeled``) and / or the remaining (``unlabeled``) samples of the
    encoder output ``skips`` in one pass; returns (labeled output, unlabeled output), None where not asked."""
    if not (labeled or unlabeled):
        return None, None
    part = skips if labeled and unlabeled else [s[:n_l] if labeled else s[n_l:] for s in skips]
    out = decode(decoder, part, None, ds)
    if not (labeled and unlabeled):
        return (out, None) if labeled else (None, out)
    return split_batch(out, n_l)


class AggregatingDecouplingTrainer_thetaUnlabeled(AggregatingDecouplingTrainer):
    """The default recipe with D_theta trained on unlabeled data only and the raw difficulty weights, as in the
    released code (this plugin's A&D default before the validation-group measurements of benchmarks/RESULTS.md)."""
    theta_supervised = False
    difficulty_normalize = False


class AggregatingDecouplingTrainer_normDifficulty(AggregatingDecouplingTrainer):
    """The default recipe without the labeled loss on D_theta: only the difficulty-aware weights normalised to
    mean 1 (not in the released code)."""
    theta_supervised = False
    difficulty_normalize = True


class AggregatingDecouplingTrainer_svda(AggregatingDecouplingTrainer):
    """The default recipe with A&D's SVDA (3 of 6 operations, p 0.7) on both streams in place of nnU-Net's
    augmentation, everything else as the default. The pseudo-labels come from the view D_theta trains on, as
    released, so that view is the whole SVDA, rotation and zoom included (its image-path encoder output is reused:
    no second encoder pass). Measures SVDA against nnU-Net's augmentation inside nnU-Net."""
    augmentation = "svda"
    pseudo_label_view = "same"


class AggregatingDecouplingTrainer_released(AggregatingDecouplingTrainer):
    """The released recipe (README command of xmed-lab/GenericSSL): SVDA on both streams, pseudo-labels and
    D_theta on the same view, independently initialised decoders, mu_max 10 with a sigmoid ramp over the whole
    run and no warm-up, SGD 0.9 Nesterov lr 1e-2 poly, wd 3e-5."""
    augmentation = "svda"
    theta_supervised = False
    difficulty_normalize = False
    pseudo_label_view = "same"
    num_strong_views = 1
    decoder_init = "independent"
    unsup_weight = 10.0
    rampup_iters = None
    rampup_fraction = 1.0
    warmup_iters = 0
    warmup_pseudo_dice = None
    optimizer_recipe = "released"
