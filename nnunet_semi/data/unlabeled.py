"""Discovery, checking and preprocessing of unlabeled images with a dataset's existing nnU-Net plans.

``nnUNetv2_preprocess_unlabeled -d 27 -c 2d 3d_fullres`` reads the unlabeled cases the layout
defines (``imagesUnlabeled/``, or the ``unlabeled`` list of ``splits_semi.json``), checks them against
the dataset (channel count, file ending, dimensionality) and their content (one complete read of each
file: a truncated or corrupt compressed file, NaN/inf voxels, a constant image), and writes each
through nnU-Net's own preprocessor of the configuration (same transpose, crop, resampling and
normalisation as the labeled cases) into ``<data_identifier>_unlabeled/`` beside nnU-Net's folder.
Every input is checked before anything is written; existing output is kept unless ``--overwrite`` is
given. The raw dataset's ``case_metadata.json`` is validated and copied into the preprocessed dataset
folder, so training finds it without ``nnUNet_raw`` (:func:`nnunet_semi.layout.find_case_metadata`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_semi.image_checks import ImageFileError, check_voxels, read_image
from nnunet_semi.layout import (IMAGES_TR, IMAGES_UNLABELED, SPLIT_FILE, LayoutError, copy_case_metadata,
                                find_image_cases, plans_identity, read_manifest, unlabeled_cases_from_raw,
                                unlabeled_manifest_file, unlabeled_preprocessed_folder)


def _nnunet_paths():
    from nnunetv2 import paths
    missing = [n for n in ("nnUNet_raw", "nnUNet_preprocessed") if getattr(paths, n) is None]
    if missing:
        raise LayoutError(f"environment variable(s) {', '.join(missing)} not set. Set them as for nnU-Net "
                          f"(see `nnUNetv2_semi_env --check`).")
    return paths.nnUNet_raw, paths.nnUNet_preprocessed


def _probe(files: Sequence[str], reader_cls, check: bool = False) -> dict:
    """Channel count and native dimensionality of one case: from the headers, or with ``check`` from one
    complete read of each file that also runs the checks of :mod:`nnunet_semi.image_checks` (a truncated
    or corrupt compressed file, NaN/inf voxels, a constant image: :class:`ImageFileError`). SimpleITK
    reads where it can, else the nnU-Net reader of the plans."""
    import SimpleITK as sitk
    channels, dims = 0, set()
    for f in files:
        try:
            if check:
                info = read_image(f, check=True)
                comps = info.GetNumberOfComponentsPerPixel()
            else:
                info = sitk.ImageFileReader()
                info.SetFileName(f)
                info.ReadImageInformation()
                comps = info.GetNumberOfComponents()
        except ImageFileError:
            raise
        except Exception:  # a format SimpleITK cannot read
            try:
                data, props = reader_cls().read_images([f])
            except Exception as e:
                raise ImageFileError(f, f"cannot be read by SimpleITK nor {reader_cls.__name__} ({e}).",
                                     "Is the file complete?") from e
            if check:
                check_voxels(data, f)
            sp = props["spacing"]
            channels += int(data.shape[0])
            dims.add(2 if np.isclose(sp[0], 999 * max(sp[1:])) or np.isclose(sp[0], 999) else 3)
            continue
        d = info.GetDimension()
        if d == 4:  # 4D NIfTI: last axis are channels
            channels += info.GetSize()[3]
            d = 3
        else:
            channels += comps
        dims.add(d)
    return {"channels": channels, "dims": dims.pop() if len(dims) == 1 else sorted(dims)}


def check_unlabeled_cases(cases: Dict[str, List[str]], raw_dataset_folder: str, dataset_json: dict,
                          reader_cls) -> None:
    """Every unlabeled case must have the dataset's channel count and dimensionality (compared with the
    header of the first labeled training image) and pass the content checks of :func:`_probe` (one
    complete read of each file)."""
    fe = dataset_json["file_ending"]
    nch = len(dataset_json["channel_names"])
    labeled = find_image_cases(os.path.join(raw_dataset_folder, IMAGES_TR), fe, nch, strict_endings=False)
    if not labeled:
        raise LayoutError(f"{os.path.join(raw_dataset_folder, IMAGES_TR)} has no labeled image to compare the "
                          f"unlabeled images with.")
    ref_case, ref_files = next(iter(sorted(labeled.items())))
    ref = _probe(ref_files, reader_cls)
    for case, files in cases.items():
        try:
            got = _probe(files, reader_cls, check=True)
        except ImageFileError as e:
            raise LayoutError(f"{e.path}: unlabeled case '{case}': {e.problem} {e.fix} Or remove the case from "
                              f"{IMAGES_UNLABELED}/ (and from the 'unlabeled' list of {SPLIT_FILE}). Nothing was "
                              f"preprocessed.") from e
        if got["channels"] != ref["channels"]:
            raise LayoutError(f"{files[0]}: unlabeled case '{case}' has {got['channels']} channel(s), the dataset "
                              f"has {ref['channels']} (dataset.json channel_names, e.g. {ref_files[0]}). Provide "
                              f"one file per channel named {case}_0000{fe} ... and no extra channels.")
        if got["dims"] != ref["dims"]:
            raise LayoutError(f"{files[0]}: unlabeled case '{case}' is a {got['dims']}D image but the labeled "
                              f"images are {ref['dims']}D (e.g. {ref_files[0]}). Convert it to the dataset's "
                              f"dimensionality or remove it.")


def _preprocess_one(args):
    case, files, out_folder, plans, configuration, dataset_json = args
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, seg, props = preprocessor.run_case(files, None, pm, cm, dataset_json)
    # the loader needs the key; an unlabeled case has no class locations
    props["class_locations"] = {}
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch = tuple(cm.patch_size)
    bd, cd = comp_blosc2_params(data.shape, patch, data.itemsize)
    bs, cs = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(out_folder, case), chunks=cd, blocks=bd,
                                  chunks_seg=cs, blocks_seg=bs)
    return case


def preprocess_unlabeled(dataset_name_or_id, configurations: Sequence[str] = ("2d", "3d_fullres"),
                         plans_identifier: str = "nnUNetPlans", num_processes: int = 2,
                         overwrite: bool = False, verbose: bool = True) -> Dict[str, str]:
    """Preprocess the dataset's unlabeled images for each configuration. Returns config -> folder."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw_root, pre_root = _nnunet_paths()
    dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    raw = os.path.join(raw_root, dataset_name)
    pre = os.path.join(pre_root, dataset_name)
    plans_file = os.path.join(pre, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise LayoutError(f"{plans_file} does not exist. Plan the labeled dataset first: "
                          f"nnUNetv2_plan_and_preprocess -d {dataset_name_or_id}"
                          + (f" -pl ... (plans '{plans_identifier}')" if plans_identifier != "nnUNetPlans" else ""))
    with open(plans_file) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    pm = PlansManager(plans)
    cases = unlabeled_cases_from_raw(raw, dataset_json)
    check_unlabeled_cases(cases, raw, dataset_json, pm.image_reader_writer_class)
    metadata_copy = copy_case_metadata(raw, pre)
    if verbose and metadata_copy:
        print(f"case metadata copied to {metadata_copy}", flush=True)

    done: Dict[str, str] = {}
    seen_identifiers = set()
    for c in configurations:
        if c not in plans["configurations"]:
            raise LayoutError(f"configuration '{c}' is not in {plans_file} (available: "
                              f"{', '.join(plans['configurations'])}).")
        cm = pm.get_configuration(c)
        if cm.previous_stage_name is not None:
            raise NotImplementedError(f"configuration '{c}' is a cascade stage; semi-supervised training of "
                                      f"cascades is not supported")
        if cm.data_identifier in seen_identifiers:
            continue
        seen_identifiers.add(cm.data_identifier)
        out = unlabeled_preprocessed_folder(pre, cm.data_identifier)
        ident = plans_identity(plans, c)
        manifest = read_manifest(pre, cm.data_identifier)
        if manifest is not None and manifest.get("plans_identity") != ident and not overwrite:
            raise LayoutError(f"{out} was preprocessed with other plans (plans identity "
                              f"{manifest.get('plans_identity')} != {ident}). Re-run with --overwrite to replace it.")
        if overwrite and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        existing = {f[:-len(".b2nd")] for f in os.listdir(out) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")}
        todo = [cs for cs in sorted(cases) if cs not in existing or not os.path.isfile(os.path.join(out, cs + ".pkl"))]
        if verbose:
            print(f"[{c}] {len(cases)} unlabeled case(s), {len(cases) - len(todo)} already preprocessed, "
                  f"writing {len(todo)} to {out}", flush=True)
        jobs = [(cs, cases[cs], out, plans, c, dataset_json) for cs in todo]
        t0 = time.time()
        if num_processes <= 1 or len(jobs) <= 1:
            results = map(_preprocess_one, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(num_processes)
            results = pool.imap_unordered(_preprocess_one, jobs)
        try:
            for i, case in enumerate(results, 1):
                if verbose and (i == len(jobs) or i % max(1, len(jobs) // 20) == 0):
                    print(f"[{c}] {i}/{len(jobs)} ({time.time() - t0:.0f} s) last: {case}", flush=True)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        stale = sorted(existing - set(cases))
        with open(unlabeled_manifest_file(pre, cm.data_identifier), "w") as f:
            json.dump({"configuration": c, "data_identifier": cm.data_identifier, "plans_identifier": plans_identifier,
                       "plans_identity": ident, "cases": sorted(cases),
                       "source_files": {k: [os.path.relpath(p, raw) for p in v] for k, v in sorted(cases.items())},
                       "stale_cases_not_in_raw": stale}, f, indent=1)
        if stale and verbose:
            print(f"[{c}] note: {len(stale)} case(s) in {out} are no longer in the raw dataset and are ignored "
                  f"by training: {stale[:5]}{' ...' if len(stale) > 5 else ''}", flush=True)
        done[c] = out
    return done


def preprocess_unlabeled_entry(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_preprocess_unlabeled",
        description="Preprocess a dataset's unlabeled images (imagesUnlabeled/ or the 'unlabeled' list of "
                    "splits_semi.json) with its existing nnU-Net plans, into "
                    "$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/. Run it after "
                    "nnUNetv2_plan_and_preprocess.")
    p.add_argument("-d", nargs="+", required=True, help="dataset name(s) or id(s)")
    p.add_argument("-c", nargs="+", default=["2d", "3d_fullres"],
                   help="configurations (default: 2d 3d_fullres; those missing from the plans are skipped "
                        "when left at the default)")
    p.add_argument("-plans_name", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)),
                   help="processes (default $nnUNet_def_n_proc or 2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing preprocessed unlabeled data")
    a = p.parse_args(argv)
    for d in a.d:
        configs = a.c
        if a.c == ["2d", "3d_fullres"]:
            from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
            pre = os.path.join(_nnunet_paths()[1], maybe_convert_to_dataset_name(d), a.plans_name + ".json")
            if os.path.isfile(pre):
                with open(pre) as f:
                    planned = json.load(f)["configurations"]
                configs = [c for c in a.c if c in planned]
        try:
            preprocess_unlabeled(d, configs, a.plans_name, a.np, a.overwrite)
        except LayoutError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    preprocess_unlabeled_entry()
