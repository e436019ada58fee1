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
    case_metadata.json  optional: domain / vendor / centre / task / dataset of origin per case
                        (see :class:`CaseMetadata`)

Preprocessed (``$nnUNet_preprocessed/DatasetXXX_Name/``)::

    <data_identifier>/              nnU-Net's labeled cases (unchanged)
    <data_identifier>_unlabeled/    the unlabeled cases, preprocessed with the same plans and
                                    nnU-Net's own preprocessor; a sibling folder, so nnU-Net's
                                    automatic splits and ``fold all`` never see them
    <data_identifier>_unlabeled.json  manifest: plans identity, case ids, source files
    case_metadata.json              copy of the raw one, made by ``nnUNetv2_preprocess_unlabeled``
                                    (read by :func:`find_case_metadata` when the raw folder is absent)

Withheld labels therefore never sit where nnU-Net (planning, fingerprint, ``gt_segmentations``,
validation) or the plugin's trainers look.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
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


def read_json(path: str):
    """The JSON content of ``path``, or None when there is no such file; unreadable JSON is a LayoutError."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LayoutError(f"{path}: cannot be read as JSON ({e}). Fix or delete the file.") from e


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
        d = read_json(path)
        if d is None:
            return None
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
        d = read_json(path)
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
# per-case metadata
# --------------------------------------------------------------------------------------------
CASE_METADATA_FILE = "case_metadata.json"
CASE_METADATA_FORMAT_VERSION = 1
#: known per-case fields -> allowed JSON types; free-form fields go under a case's "extra"
CASE_FIELDS = {"domain": (str,), "vendor": (str,), "centre": (str, int), "task": (str, int),
               "origin_dataset": (str,)}
_METADATA_KEYS = ("format", "target_domain", "source_domains", "extra", "cases")


def _type_names(types) -> str:
    return " or ".join({str: "a string", int: "an integer"}[t] for t in types)


@dataclass
class CaseMetadata:
    """Per-case domain, vendor, centre, task and dataset of origin, stored as ``case_metadata.json``
    beside ``splits_semi.json``::

        {"format": 1, "target_domain": "MR", "source_domains": ["CT"], "extra": {},
         "cases": {"ct_train_1001": {"domain": "CT", "origin_dataset": "MMWHS"},
                   "A0S9V9_ED": {"domain": "A", "vendor": "A", "centre": 1, "extra": {"any": "JSON"}}}}

    Every field is optional (per case and at the top). Case keys are nnU-Net case ids, which are also
    the preprocessed identifiers a trainer sees (``batch["keys"]``, ``UnlabeledBatch.keys``).
    """
    cases: Dict[str, dict] = field(default_factory=dict)
    target_domain: Optional[str] = None
    source_domains: List[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def set(self, case: str, **fields) -> None:
        """Add ``fields`` (those in :data:`CASE_FIELDS`, or ``extra=dict``) to ``case``; None values are left out."""
        entry = dict(self.cases.get(case, {}))
        for k, v in fields.items():
            if v is None:
                continue
            entry[k] = {**entry.get("extra", {}), **v} if k == "extra" and isinstance(v, dict) else v
        _check_case_entry(CASE_METADATA_FILE, case, entry)
        self.cases[case] = entry

    def get(self, case: str) -> dict:
        """The fields of ``case`` (a copy; ``{}`` for a case without metadata)."""
        return dict(self.cases.get(case, {}))

    def domain_of(self, case: str) -> Optional[str]:
        return self.cases.get(case, {}).get("domain")

    def task_of(self, case: str):
        return self.cases.get(case, {}).get("task")

    def __contains__(self, case: str) -> bool:
        return case in self.cases

    def to_json(self) -> dict:
        d: dict = {"format": CASE_METADATA_FORMAT_VERSION}
        if self.target_domain is not None:
            d["target_domain"] = self.target_domain
        if self.source_domains:
            d["source_domains"] = list(self.source_domains)
        if self.extra:
            d["extra"] = dict(self.extra)
        d["cases"] = {c: dict(e) for c, e in self.cases.items()}
        return d

    @classmethod
    def from_json(cls, d, where: str = CASE_METADATA_FILE) -> "CaseMetadata":
        """Parse and validate; a :class:`LayoutError` names ``where`` and the fix."""
        if not isinstance(d, dict):
            raise LayoutError(f"{where}: must hold a JSON object with 'format' and 'cases'.")
        if d.get("format") != CASE_METADATA_FORMAT_VERSION:
            raise LayoutError(f"{where}: unknown format {d.get('format')!r}; this nnunet_semi reads format "
                              f"{CASE_METADATA_FORMAT_VERSION} (see CaseMetadata in nnunet_semi/layout.py). "
                              f"Rewrite the file in that format or update nnunet_semi.")
        unknown = sorted(set(d) - set(_METADATA_KEYS))
        if unknown:
            raise LayoutError(f"{where}: unknown key(s) {unknown} (allowed: {', '.join(_METADATA_KEYS)}). "
                              f"Put free-form setting fields under 'extra'.")
        if not isinstance(d.get("cases", {}), dict):
            raise LayoutError(f"{where}: 'cases' must be an object mapping case ids to their fields.")
        md = cls(cases=dict(d.get("cases", {})), target_domain=d.get("target_domain"),
                 source_domains=d.get("source_domains", []), extra=d.get("extra", {}))
        md.validate(where)
        return md

    def validate(self, where: str = CASE_METADATA_FILE) -> None:
        if self.target_domain is not None and not isinstance(self.target_domain, str):
            raise LayoutError(f"{where}: 'target_domain' must be a string, not {self.target_domain!r}.")
        if not isinstance(self.source_domains, list) or not all(isinstance(x, str) for x in self.source_domains):
            raise LayoutError(f"{where}: 'source_domains' must be a list of strings, not {self.source_domains!r}.")
        if self.target_domain in self.source_domains:
            raise LayoutError(f"{where}: target domain '{self.target_domain}' is also listed in 'source_domains'.")
        if not isinstance(self.extra, dict):
            raise LayoutError(f"{where}: 'extra' must be an object, not {self.extra!r}.")
        for case, entry in self.cases.items():
            _check_case_entry(where, case, entry)

    def check_cases(self, split: SemiSplit, where: str = CASE_METADATA_FILE) -> None:
        """Every case with metadata must be in ``split`` (any group)."""
        known = set(split.labeled) | set(split.unlabeled) | set(split.val) | set(split.test)
        extra = [c for c in self.cases if c not in known]
        if extra:
            raise LayoutError(f"{where}: case(s) {extra[:5]} are not in the split ({SPLIT_FILE}). Remove them "
                              f"from 'cases' or add them to the split.")

    def save(self, raw_dataset_folder: str) -> str:
        """Validate (against the folder's splits_semi.json where present) and write the file."""
        path = case_metadata_file(raw_dataset_folder)
        self.validate(path)
        split = SemiSplit.load(raw_dataset_folder)
        if split is not None:
            self.check_cases(split, path)
        blob = json.dumps(self.to_json(), indent=2)  # fails before the file is touched if not JSON
        with open(path, "w") as f:
            f.write(blob)
        return path


def _check_case_entry(where: str, case, entry) -> None:
    if not isinstance(case, str) or not isinstance(entry, dict):
        raise LayoutError(f"{where}: case {case!r} must map to an object of fields, not {entry!r}.")
    for k, v in entry.items():
        if k == "extra":
            if not isinstance(v, dict):
                raise LayoutError(f"{where}: case '{case}': 'extra' must be an object, not {v!r}.")
        elif k not in CASE_FIELDS:
            raise LayoutError(f"{where}: case '{case}': unknown field '{k}' (known: {', '.join(CASE_FIELDS)}). "
                              f"Put free-form fields under the case's 'extra'.")
        elif isinstance(v, bool) or not isinstance(v, CASE_FIELDS[k]):
            raise LayoutError(f"{where}: case '{case}': '{k}' must be {_type_names(CASE_FIELDS[k])}, not {v!r} "
                              f"(leave the field out when it is unknown).")


def case_metadata_file(folder: str) -> str:
    return os.path.join(folder, CASE_METADATA_FILE)


def load_case_metadata(folder: str) -> Optional[CaseMetadata]:
    """The ``case_metadata.json`` of a raw (or preprocessed) dataset folder, validated, checked against
    the folder's splits_semi.json where present; None without the file."""
    path = case_metadata_file(folder)
    d = read_json(path)
    if d is None:
        return None
    md = CaseMetadata.from_json(d, path)
    split = SemiSplit.load(folder)
    if split is not None:
        md.check_cases(split, path)
    return md


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


def raw_dataset_folder_of(preprocessed_dataset_folder_base: str) -> Optional[str]:
    """``$nnUNet_raw/<dataset name>`` for a preprocessed dataset folder, or None when ``nnUNet_raw`` is
    unset or holds no such folder."""
    raw_root = os.environ.get("nnUNet_raw")
    if not raw_root:
        return None
    raw = os.path.join(raw_root, os.path.basename(os.path.normpath(preprocessed_dataset_folder_base)))
    return raw if os.path.isdir(raw) else None


def find_case_metadata(preprocessed_dataset_folder_base: str) -> Optional[CaseMetadata]:
    """The case metadata for training on a preprocessed dataset: the raw dataset's file when the raw
    folder is available (:func:`raw_dataset_folder_of`), else the copy ``nnUNetv2_preprocess_unlabeled``
    left in the preprocessed folder; None when there is none."""
    raw = raw_dataset_folder_of(preprocessed_dataset_folder_base)
    return load_case_metadata(raw if raw is not None else preprocessed_dataset_folder_base)


def copy_case_metadata(raw_dataset_folder: str, preprocessed_dataset_folder_base: str) -> Optional[str]:
    """Validate the raw dataset's case metadata and copy it into the preprocessed folder (a copy left
    from earlier is removed when the raw dataset has none). Returns the copy's path or None."""
    dst = case_metadata_file(preprocessed_dataset_folder_base)
    if load_case_metadata(raw_dataset_folder) is None:
        if os.path.isfile(dst):
            os.remove(dst)
        return None
    shutil.copyfile(case_metadata_file(raw_dataset_folder), dst)
    return dst


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def require_disjoint(*groups: Sequence[str]) -> None:
    seen = set()
    for g in groups:
        inter = seen.intersection(g)
        if inter:
            raise LayoutError(f"cases appear in more than one group: {sorted(inter)[:5]}")
        seen.update(g)
