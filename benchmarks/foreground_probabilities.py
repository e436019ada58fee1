"""How deep in nnU-Net's all-background phase is a trained network?

Loads a checkpoint (the plain network, as ``nnUNetv2_predict`` does), runs it on one centre crop of the
patch size from each of the first ``-n`` preprocessed labeled and unlabeled cases, and prints per group: the
largest and mean foreground probability, the share of voxels predicted as foreground, the share passing a
confidence threshold (``--tau``), and per foreground class S = the sum of its squared probabilities over
those voxels and the crop batch. A Dice with squared denominators (the CrossMatch / SSL4MIS Dice) scores a
class absent from a pseudo-label smooth / (S + smooth): flat while S >> smooth, a steep pull of the class to 0
once S is near or below it (see benchmarks/RESULTS.md).

    export nnUNet_preprocessed=...
    python benchmarks/foreground_probabilities.py \\
        <nnUNet_results>/Dataset104_Hippocampus/CrossMatchTrainer__nnUNetPlans__3d_fullres_cpu/fold_all/checkpoint_final.pth
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Sequence

import numpy as np


def centre_crop(image: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """(C, *spatial) -> (C, *patch_size): centre crop, zero-padded at the end where the image is smaller."""
    sl = tuple(slice(max(0, (s - p) // 2), max(0, (s - p) // 2) + p) for s, p in zip(image.shape[1:], patch_size))
    image = image[(slice(None),) + sl]
    return np.pad(image, [(0, 0)] + [(0, p - s) for s, p in zip(image.shape[1:], patch_size)])


def foreground_statistics(probs, tau: float = 0.95) -> dict:
    """probs: (B, C, *spatial) softmax output, class 0 = background."""
    fg = probs[:, 1:]
    kept = probs.max(1).values >= tau
    return {"max_p_fg": fg.max().item(), "mean_p_fg": fg.mean().item(),
            "argmax_fg_share": (probs.argmax(1) > 0).float().mean().item(),
            "kept_share": kept.float().mean().item(),
            "sum_p2_kept": [(fg[:, c] ** 2 * kept).sum().item() for c in range(fg.shape[1])]}


def load_cases(folder: str, n: int) -> List[np.ndarray]:
    import blosc2
    names = sorted(f for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))[:n]
    if not names:
        raise SystemExit(f"no preprocessed case (*.b2nd) in {folder}")
    return [blosc2.open(os.path.join(folder, f), mode="r")[:] for f in names]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint_final.pth / checkpoint_latest.pth of an nnU-Net training")
    ap.add_argument("-n", type=int, default=8, help="cases per group (default 8)")
    ap.add_argument("--tau", type=float, default=0.95, help="confidence threshold (default 0.95, CrossMatch's)")
    ap.add_argument("--preprocessed", default=os.environ.get("nnUNet_preprocessed"),
                    help="nnUNet_preprocessed (default: the variable)")
    args = ap.parse_args(argv)
    if not args.preprocessed:
        raise SystemExit("set nnUNet_preprocessed or pass --preprocessed")
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"{args.checkpoint} does not exist: pass a checkpoint_final.pth or checkpoint_latest.pth "
                         f"from <nnUNet_results>/<Dataset>/<trainer>__<plans>__<configuration>/fold_<f>/")
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_semi.layout import unlabeled_preprocessed_folder

    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    init = ck["init_args"]
    pm = PlansManager(init["plans"])
    cm = pm.get_configuration(init["configuration"])
    n_in = len(init["dataset_json"]["channel_names"])
    n_out = pm.get_label_manager(init["dataset_json"]).num_segmentation_heads
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                 deep_supervision=False)
    net.load_state_dict(ck["network_weights"])
    net.eval()
    base = os.path.join(args.preprocessed, pm.dataset_name)
    groups = (("labeled", os.path.join(base, cm.data_identifier)),
              ("unlabeled", unlabeled_preprocessed_folder(base, cm.data_identifier)))
    print(f"{args.checkpoint}: epoch {ck.get('current_epoch')}, {init['configuration']}, patch {cm.patch_size}")
    for name, folder in groups:
        if not os.path.isdir(folder):
            print(f"{name}: {folder} does not exist, skipped")
            continue
        x = np.stack([centre_crop(c, cm.patch_size) for c in load_cases(folder, args.n)]).astype(np.float32)
        with torch.no_grad():
            st = foreground_statistics(torch.softmax(net(torch.from_numpy(x)).float(), 1), args.tau)
        print(f"{name}: {len(x)} crops; foreground probability max {st['max_p_fg']:.3g}, mean {st['mean_p_fg']:.3g}; "
              f"predicted foreground {100 * st['argmax_fg_share']:.2f}% of voxels; confidence >= {args.tau:g}: "
              f"{100 * st['kept_share']:.1f}%; S per foreground class (sum of p^2 over those voxels): "
              + ", ".join(f"{v:.3g}" for v in st["sum_p2_kept"]))


if __name__ == "__main__":
    sys.exit(main())
