"""The on-disk layout of semi-supervised nnU-Net datasets, defined once for the whole plugin.

Raw dataset (``$nnUNet_raw/DatasetXXX_Name/``)::

    dataset.json        nnU-Net's own file; ``numTraining`` counts the labeled cases only
    imagesTr/ labelsTr/ labeled training cases: the only cases nnU-Net's planning,
                        fingerprint and preprocessing ever read
    imagesUnlabeled/    training images without a usable label, named like imagesTr
                        (``CASE_0000.nii.gz`` ...): images that have no label at all, and
                        images whose label is withheld by the labeled setting
    labelsWithheld/     optional: labels that exist but are withheld from training by the
                        setting. Nothing in training, planning or validation reads it; it is
                        kept apart for analysis only (e.g. pseudo-label quality)
    imagesTs/ labelsTs/ held-out cases (the split's ``val`` and ``test`` groups); labelsTs is
                        read by evaluation only
    splits_standard/    optional: ``<setting>.json`` for every standard labeled setting of a
                        benchmark dataset (same format as splits_semi.json), for reference
    splits_semi.json    the semi-supervised split (see :class:`SemiSplit`)
    splits_standard/    optional: ``<setting>.json`` (same format as splits_semi.json) for every
                        standard labeled setting of the dataset (e.g. ``8_labeled.json``);
                        reference only, the folders above follow splits_semi.json

Preprocessed (``$nnUNet_preprocessed/DatasetXXX_Name/``)::

    <data_identifier>/              nnU-Net's labeled cases (unchanged)
    <data_identifier>_unlabeled/    the unlabeled cases, preprocessed with the same plans and
                                    nnU-Net's own preprocessor; a sibling folder, so nnU-Net's
                                    automatic splits and ``fold all`` never see them
    <data_identifier>_unlabeled.json  manifest: plans identity, case ids, source files

Withheld labels therefore never sit where nnU-Net (planning, fingerprint, ``gt_segmentations``,
validation) or the plugin's trainers look.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

IMAGES_TR = "imagesTr"
LABELS_TR = "labelsTr"
IMAGES_UNLABELED = "imagesUnlabeled"
LABELS_WITHHELD = "labelsWithheld"
IMAGES_TS = "imagesTs"
LABELS_TS = "labelsTs"
SPLIT_FILE = "splits_semi.json"
STANDARD_SPLITS_DIR = "splits_standard"
UNLABELED_FOLDER_SUFFIX = "_unlabeled"
SPLIT_FORMAT_VERSION = 1


class LayoutError(RuntimeError):
    """Bad input on disk. The message names the file and says how to fix it."""


# --------------------------------------------------------------------------------------------
# case naming (nnU-Net convention: CASE_XXXX<file_ending> for images, CASE<file_ending> for labels)
# --------------------------------------------------------------------------------------------
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def image_filename(case: str, channel: int, file_ending: str) -> str:
    return f"{case}_{channel:04d}{file_ending}"


def label_filename(case: str, file_ending: str) -> str:
    return f"{case}{file_ending}"


def find_image_cases(folder: str, file_ending: str, num_channels: int,
                     strict_endings: bool = True) -> Dict[str, List[str]]:
    """Case id -> channel files (sorted by channel) for an nnU-Net style image folder.

    Raises :class:`LayoutError` naming the file when a file has another ending than the
    dataset's, does not follow ``CASE_XXXX`` naming, or a case has the wrong channels.
    """
    if not os.path.isdir(folder):
        return {}
    cases: Dict[str, Dict[int, str]] = {}
    for fname in sorted(os.listdir(folder)):
        path = os.path.join(folder, fname)
        if fname.startswith(".") or os.path.isdir(path):
            continue
        if not fname.endswith(file_ending):
            if strict_endings:
                raise LayoutError(
                    f"{path}: file ending differs from the dataset's file_ending '{file_ending}' "
                    f"(dataset.json). Convert it to '{file_ending}' or remove it from {folder}.")
            continue
        stem = fname[: -len(file_ending)]
        m = _CHANNEL_RE.match(stem)
        if m is None:
            raise LayoutError(
                f"{path}: name does not follow nnU-Net's CASE_XXXX{file_ending} convention "
                f"(e.g. {image_filename('case_001', 0, file_ending)}). Rename it.")
        cases.setdefault(m.group("case"), {})[int(m.group("channel"))] = path
    out: Dict[str, List[str]] = {}
    for case, chans in cases.items():
        expected = list(range(num_channels))
        if sorted(chans) != expected:
            have = ", ".join(os.path.basename(chans[c]) for c in sorted(chans))
            want = ", ".join(image_filename(case, c, file_ending) for c in expected)
            raise LayoutError(
                f"{folder}: case '{case}' has channel files [{have}] but the dataset has "
                f"{num_channels} channel(s) (dataset.json channel_names): expected [{want}].")
        out[case] = [chans[c] for c in expected]
    return out


# --------------------------------------------------------------------------------------------
# the semi-supervised split
# --------------------------------------------------------------------------------------------
@dataclass
class SemiSplit:
    """Which cases are labeled, unlabeled and held out, for one labeled setting.

    Stored as ``splits_semi.json`` in the raw dataset folder::

        {"format": 1, "setting": "8 labeled", "seed": 12345,
         "labeled": [...], "unlabeled": [...], "test": [...], "val": [...],
         "notes": "free text: where the lists come from"}

    ``labeled`` cases live in imagesTr/labelsTr, ``unlabeled`` in imagesUnlabeled, ``test`` in
    imagesTs. ``val`` is optional: held-out labeled cases used for model selection (e.g. ACDC's
    validation patients); it is never used for training.
    """
    labeled: List[str]
    unlabeled: List[str]
    test: List[str] = field(default_factory=list)
    val: List[str] = field(default_factory=list)
    setting: str = ""
    seed: Optional[int] = None
    notes: str = ""

    def to_json(self) -> dict:
        return {"format": SPLIT_FORMAT_VERSION, "setting": self.setting, "seed": self.seed,
                "labeled": list(self.labeled), "unlabeled": list(self.unlabeled),
                "test": list(self.test), "val": list(self.val), "notes": self.notes}

    def save(self, raw_dataset_folder: str) -> str:
        self.check_disjoint()
        path = os.path.join(raw_dataset_folder, SPLIT_FILE)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        return path

    @classmethod
    def load(cls, raw_dataset_folder: str) -> Optional["SemiSplit"]:
        path = os.path.join(raw_dataset_folder, SPLIT_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LayoutError(f"{path}: cannot be read as JSON ({e}). Fix or delete the file.") from e
        for key in ("labeled", "unlabeled"):
            if not isinstance(d.get(key), list):
                raise LayoutError(f"{path}: key '{key}' must be a list of case ids.")
        split = cls(labeled=d["labeled"], unlabeled=d["unlabeled"], test=d.get("test", []),
                    val=d.get("val", []), setting=d.get("setting", ""), seed=d.get("seed"),
                    notes=d.get("notes", ""))
        split.check_disjoint(path)
        return split

    def check_disjoint(self, where: str = SPLIT_FILE) -> None:
        groups = {"labeled": self.labeled, "unlabeled": self.unlabeled, "test": self.test, "val": self.val}
        seen: Dict[str, str] = {}
        for name, ids in groups.items():
            for c in ids:
                if c in seen:
                    raise LayoutError(f"{where}: case '{c}' is listed both as {seen[c]} and as {name}. "
                                      f"A case belongs to exactly one group.")
                seen[c] = name


_SETTING_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def standard_split_file(raw_dataset_folder: str, setting: str) -> str:
    """``<raw>/splits_standard/<setting>.json``; ``setting`` is a file-name-safe key such as ``8_labeled``."""
    if not _SETTING_RE.match(setting):
        raise LayoutError(f"standard split setting '{setting}': use letters, digits, '_', '.', '-' only "
                          f"(it becomes the file name {STANDARD_SPLITS_DIR}/<setting>.json).")
    return os.path.join(raw_dataset_folder, STANDARD_SPLITS_DIR, setting + ".json")


def save_standard_split(raw_dataset_folder: str, setting: str, split: SemiSplit) -> str:
    """Write one standard labeled setting to ``splits_standard/<setting>.json`` (SemiSplit format)."""
    path = standard_split_file(raw_dataset_folder, setting)
    split.check_disjoint(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(split.to_json(), f, indent=2)
    return path


def load_standard_splits(raw_dataset_folder: str) -> Dict[str, SemiSplit]:
    """Setting -> SemiSplit for every ``splits_standard/*.json`` of a raw dataset ({} if none)."""
    folder = os.path.join(raw_dataset_folder, STANDARD_SPLITS_DIR)
    out: Dict[str, SemiSplit] = {}
    if not os.path.isdir(folder):
        return out
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".json"):
            continue
        path = os.path.join(folder, fname)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LayoutError(f"{path}: cannot be read as JSON ({e}). Fix or delete the file.") from e
        split = SemiSplit(labeled=d["labeled"], unlabeled=d["unlabeled"], test=d.get("test", []),
                          val=d.get("val", []), setting=d.get("setting", ""), seed=d.get("seed"),
                          notes=d.get("notes", ""))
        split.check_disjoint(path)
        out[fname[:-len(".json")]] = split
    return out


def check_split_against_raw(raw_dataset_folder: str, split: SemiSplit, dataset_json: dict) -> None:
    """Every case the split names must exist where the layout puts it, and no case the split
    calls unlabeled may have a label where nnU-Net planning would read it."""
    fe = dataset_json["file_ending"]
    nch = len(dataset_json["channel_names"])
    path = os.path.join(raw_dataset_folder, SPLIT_FILE)
    labeled = find_image_cases(os.path.join(raw_dataset_folder, IMAGES_TR), fe, nch)
    unlabeled = find_image_cases(os.path.join(raw_dataset_folder, IMAGES_UNLABELED), fe, nch)
    for c in split.unlabeled:
        if c in labeled or os.path.isfile(os.path.join(raw_dataset_folder, LABELS_TR, label_filename(c, fe))):
            raise LayoutError(
                f"{path}: case '{c}' is listed as unlabeled but is in {IMAGES_TR}/{LABELS_TR}, where "
                f"nnU-Net's planning would read its label. Move its image(s) to {IMAGES_UNLABELED}/ and its "
                f"label to {LABELS_WITHHELD}/ (or list it as labeled).")
        if c not in unlabeled:
            raise LayoutError(
                f"{path}: lists unlabeled case '{c}' but {os.path.join(raw_dataset_folder, IMAGES_UNLABELED)} "
                f"has no {image_filename(c, 0, fe)}. Add the image or remove the case from the split.")
    for c in split.labeled:
        if c not in labeled:
            raise LayoutError(
                f"{path}: lists labeled case '{c}' but {os.path.join(raw_dataset_folder, IMAGES_TR)} has no "
                f"{image_filename(c, 0, fe)}. Add the image and its label or remove the case from the split.")


def unlabeled_cases_from_raw(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """The unlabeled training cases of a raw dataset: case -> image files.

    With a ``splits_semi.json`` its ``unlabeled`` list is authoritative (and checked); without one,
    every case in ``imagesUnlabeled/`` is used.
    """
    fe = dataset_json["file_ending"]
    nch = len(dataset_json["channel_names"])
    folder = os.path.join(raw_dataset_folder, IMAGES_UNLABELED)
    cases = find_image_cases(folder, fe, nch)
    split = SemiSplit.load(raw_dataset_folder)
    if split is not None:
        check_split_against_raw(raw_dataset_folder, split, dataset_json)
        cases = {c: cases[c] for c in split.unlabeled}
    if not cases:
        raise LayoutError(
            f"No unlabeled images found: {folder} is empty or missing"
            + (f" and {os.path.join(raw_dataset_folder, SPLIT_FILE)} lists no unlabeled case" if split else "")
            + f". Put the unlabeled scans there named like imagesTr "
              f"({image_filename('case_001', 0, fe)}, one file per channel).")
    return cases


# --------------------------------------------------------------------------------------------
# preprocessed layout
# --------------------------------------------------------------------------------------------
def unlabeled_preprocessed_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + UNLABELED_FOLDER_SUFFIX)


def unlabeled_manifest_file(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return unlabeled_preprocessed_folder(preprocessed_dataset_folder_base, data_identifier) + ".json"


def plans_identity(plans: dict, configuration: str) -> str:
    """A short hash of everything in the plans that changes preprocessed data of a configuration
    (resolved through nnU-Net's ``inherits_from``, so a configuration that only changes the network,
    e.g. a smaller CPU variant, shares the identity and the preprocessed data of its parent)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cfg = PlansManager(plans).get_configuration(configuration).configuration
    relevant = {k: cfg.get(k) for k in ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                                         "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs")}
    relevant["transpose_forward"] = plans.get("transpose_forward")
    relevant["foreground_intensity_properties_per_channel"] = plans.get(
        "foreground_intensity_properties_per_channel")
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def read_manifest(preprocessed_dataset_folder_base: str, data_identifier: str) -> Optional[dict]:
    path = unlabeled_manifest_file(preprocessed_dataset_folder_base, data_identifier)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def require_disjoint(*groups: Sequence[str]) -> None:
    seen = set()
    for g in groups:
        inter = seen.intersection(g)
        if inter:
            raise LayoutError(f"cases appear in more than one group: {sorted(inter)[:5]}")
        seen.update(g)
