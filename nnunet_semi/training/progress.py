"""nnU-Net's progress.png with the semi-supervised curves added underneath.

nnU-Net's own three panels (losses + pseudo Dice, epoch time, learning rate) are drawn by nnU-Net
itself; a fourth panel with the SSL terms (supervised and unsupervised loss, unsupervised weight,
pseudo-label confidence, mask ratio) is drawn here at the same width and appended, so the file stays
the one picture nnU-Net users already look at.
"""
from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt
import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

NNUNET_KEYS = ('mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region', 'train_losses', 'val_losses', 'lrs',
               'epoch_start_timestamps', 'epoch_end_timestamps')
#: logged terms that are ratios or thresholds in [0, 1] (drawn on their own axis here and in benchmark reports);
#: ``clip_ratio_<optimizer>`` of a method's other optimizers counts too (see :func:`axis_of`)
RATIO_KEYS = ('pl_confidence', 'mask_ratio', 'unsup_weight_factor', 'tau', 'clip_ratio')
#: logged terms on a scale of their own (the gradient norm before clipping, also ``grad_norm_<optimizer>``)
OWN_SCALE_KEYS = ('grad_norm',)


def axis_of(key: str) -> str:
    """Where a logged plugin term is drawn: ``'ratio'`` (values in [0, 1]), ``'own'`` (a panel of its own) or
    ``'loss'``; per-optimizer terms (``grad_norm_teacher``, ``clip_ratio_teacher``) follow their family."""
    if key in RATIO_KEYS or key.startswith("clip_ratio_"):
        return "ratio"
    if key in OWN_SCALE_KEYS or key.startswith("grad_norm_"):
        return "own"
    return "loss"


class SemiLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger that accepts extra per-epoch keys and plots them."""

    def register(self, key: str) -> None:
        """Add a per-epoch key; epochs logged before it existed (resume) are filled with NaN."""
        if key not in self.my_fantastic_logging:
            n = len(self.my_fantastic_logging['train_losses'])
            self.my_fantastic_logging[key] = [float('nan')] * max(0, n - 1)

    def extra_keys(self):
        return [k for k in self.my_fantastic_logging if k not in NNUNET_KEYS]

    def plot_progress_png(self, output_folder):
        extra = self.extra_keys()
        if not extra:
            return super().plot_progress_png(output_folder)
        from PIL import Image
        with tempfile.TemporaryDirectory() as tmp:
            super().plot_progress_png(tmp)
            base = Image.open(os.path.join(tmp, "progress.png")).convert("RGB")
            base.load()
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        x = list(range(epoch + 1))
        dpi = 100
        own = [k for k in extra if axis_of(k) == "own"]
        fig, axes = plt.subplots(2 if own else 1, 1, figsize=(base.width / dpi, 27 if own else 18), dpi=dpi,
                                 squeeze=False, gridspec_kw={"height_ratios": [2, 1] if own else [1]})
        ax = axes[0, 0]
        ax2 = ax.twinx()
        colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
        for i, k in enumerate(extra):
            y = np.asarray(self.my_fantastic_logging[k][:epoch + 1], dtype=float)
            target = {"own": axes[1, 0], "ratio": ax2}.get(axis_of(k), ax)
            target.plot(x, y, color=colors[i % len(colors)], ls='dotted' if target is ax2 else '-',
                        label=k, linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("semi-supervised losses")
        ax2.set_ylabel("confidence / mask ratio / weight factor / threshold")
        ax2.set_ylim(0, 1.05)
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.35, 1))
        if own:
            axes[1, 0].set_xlabel("epoch")
            axes[1, 0].set_ylabel("gradient norm before clipping (mean per epoch)")
            axes[1, 0].legend(loc="upper right")
        plt.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            fig.savefig(os.path.join(tmp, "ssl.png"), dpi=dpi)
            plt.close(fig)
            ssl = Image.open(os.path.join(tmp, "ssl.png")).convert("RGB")
            ssl.load()
        out = Image.new("RGB", (max(base.width, ssl.width), base.height + ssl.height), "white")
        out.paste(base, (0, 0))
        out.paste(ssl, (0, base.height))
        tmp_out = os.path.join(output_folder, ".progress.png.tmp")
        out.save(tmp_out, format="PNG")
        os.replace(tmp_out, os.path.join(output_folder, "progress.png"))
