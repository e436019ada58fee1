"""Per-case metadata (case_metadata.json, nnunet_semi.layout.CaseMetadata): schema, validation errors,
writing by the converters' writer, the copy into the preprocessed folder and lookup by nnU-Net's keys."""
import json
import os

import numpy as np
import pytest

from nnunet_semi.conversion.common import ConversionError, RawDatasetWriter
from nnunet_semi.layout import (CASE_METADATA_FILE, CaseMetadata, LayoutError, SemiSplit, find_case_metadata,
                                load_case_metadata, raw_dataset_folder_of)

SPLIT = SemiSplit(labeled=["l1", "l2"], unlabeled=["u1", "u2"], val=["v1"], test=["t1"], setting="s")


def saved(tmp_path, md: CaseMetadata, split: SemiSplit = SPLIT) -> str:
    folder = str(tmp_path / "Dataset900_Meta")
    os.makedirs(folder, exist_ok=True)
    split.save(folder)
    md.save(folder)
    return folder


def example() -> CaseMetadata:
    md = CaseMetadata(target_domain="B", source_domains=["A"], extra={"note": "free text"})
    md.set("l1", domain="A", vendor="Siemens", centre=1, task=0, origin_dataset="DS1")
    md.set("u1", domain="A", centre="Barcelona", task="pancreas", extra={"slices": 12})
    md.set("v1", domain="B", vendor=None)  # None: left out
    md.set("t1", domain="B", origin_dataset="DS2", extra={"k": [1, 2]})
    return md


def test_round_trip_and_lookup(tmp_path):
    md = example()
    folder = saved(tmp_path, md)
    on_disk = json.load(open(os.path.join(folder, CASE_METADATA_FILE)))
    assert on_disk["format"] == 1 and on_disk["target_domain"] == "B" and on_disk["source_domains"] == ["A"]
    assert on_disk["cases"]["v1"] == {"domain": "B"}
    back = load_case_metadata(folder)
    assert back == md
    assert back.get("l1") == {"domain": "A", "vendor": "Siemens", "centre": 1, "task": 0, "origin_dataset": "DS1"}
    assert back.get("u1")["extra"] == {"slices": 12} and back.task_of("u1") == "pancreas"
    assert back.domain_of("t1") == "B" and back.task_of("t1") is None
    # cases of the split without metadata: empty, no error
    assert "l2" not in back and back.get("l2") == {} and back.domain_of("l2") is None
    # get returns a copy
    back.get("l1")["domain"] = "changed"
    assert back.domain_of("l1") == "A"


def test_set_merges_extra_and_checks_types():
    md = CaseMetadata()
    md.set("c", domain="A", extra={"a": 1})
    md.set("c", vendor="V", extra={"b": 2})
    assert md.get("c") == {"domain": "A", "vendor": "V", "extra": {"a": 1, "b": 2}}
    with pytest.raises(LayoutError, match=r"case 'c': 'centre' must be a string or an integer, not 1\.5"):
        md.set("c", centre=1.5)
    with pytest.raises(LayoutError, match="unknown field 'site'.*under the case's 'extra'"):
        md.set("c", site="x")
    assert md.get("c") == {"domain": "A", "vendor": "V", "extra": {"a": 1, "b": 2}}  # unchanged by the failures


def test_dataset_without_the_file(tmp_path, monkeypatch):
    folder = str(tmp_path / "Dataset901_None")
    os.makedirs(folder)
    SPLIT.save(folder)
    assert load_case_metadata(folder) is None
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert find_case_metadata(str(tmp_path / "pre" / "Dataset901_None")) is None


@pytest.mark.parametrize("content,fragments", [
    ({"format": 2, "cases": {}}, ["unknown format 2", "format 1", "Rewrite the file"]),
    ({"cases": {}}, ["unknown format None"]),
    ([1, 2], ["must hold a JSON object"]),
    ({"format": 1, "cases": {}, "setting": "x"}, ["unknown key(s) ['setting']", "under 'extra'"]),
    ({"format": 1, "cases": []}, ["'cases' must be an object"]),
    ({"format": 1, "cases": {"l1": {"site": "x"}}}, ["case 'l1'", "unknown field 'site'", "under the case's 'extra'"]),
    ({"format": 1, "cases": {"l1": {"domain": 3}}}, ["case 'l1'", "'domain' must be a string, not 3"]),
    ({"format": 1, "cases": {"l1": {"centre": True}}}, ["'centre' must be a string or an integer, not True"]),
    ({"format": 1, "cases": {"l1": {"task": [1]}}}, ["'task' must be a string or an integer"]),
    ({"format": 1, "cases": {"l1": {"vendor": None}}}, ["'vendor' must be a string, not None",
                                                        "leave the field out"]),
    ({"format": 1, "cases": {"l1": {"extra": 5}}}, ["case 'l1': 'extra' must be an object"]),
    ({"format": 1, "cases": {"l1": "A"}}, ["case 'l1' must map to an object"]),
    ({"format": 1, "cases": {}, "target_domain": 1}, ["'target_domain' must be a string"]),
    ({"format": 1, "cases": {}, "source_domains": "A"}, ["'source_domains' must be a list of strings"]),
    ({"format": 1, "cases": {}, "target_domain": "A", "source_domains": ["A"]},
     ["target domain 'A' is also listed in 'source_domains'"]),
    ({"format": 1, "cases": {"l1": {}, "x9": {"domain": "A"}}}, ["case(s) ['x9'] are not in the split",
                                                                 "splits_semi.json", "add them to the split"]),
])
def test_validation_errors_name_the_file_and_the_fix(tmp_path, content, fragments):
    folder = str(tmp_path / "Dataset902_Bad")
    os.makedirs(folder)
    SPLIT.save(folder)
    path = os.path.join(folder, CASE_METADATA_FILE)
    with open(path, "w") as f:
        json.dump(content, f)
    with pytest.raises(LayoutError) as e:
        load_case_metadata(folder)
    assert str(e.value).startswith(path + ":")
    for frag in fragments:
        assert frag in str(e.value)


def test_unreadable_json_and_save_refuses_cases_outside_the_split(tmp_path):
    folder = str(tmp_path / "Dataset903_Bad")
    os.makedirs(folder)
    SPLIT.save(folder)
    path = os.path.join(folder, CASE_METADATA_FILE)
    open(path, "w").write("{not json")
    with pytest.raises(LayoutError, match="cannot be read as JSON.*Fix or delete the file"):
        load_case_metadata(folder)
    md = CaseMetadata()
    md.set("nope", domain="A")
    with pytest.raises(LayoutError, match=r"case\(s\) \['nope'\] are not in the split"):
        md.save(folder)
    assert open(path).read() == "{not json"  # not touched


# ------------------------------------------------------------------------------ converters' writer
def write_tiny_dataset(root, dataset_id=904, origin="Tiny", metadata=None, extra_case=None) -> str:
    """A raw dataset written by RawDatasetWriter: 1 labeled, 2 unlabeled, 1 test case of 6^3 voxels."""
    rng = np.random.default_rng(0)
    w = RawDatasetWriter(str(root), dataset_id, "Tiny", {0: "MRI"}, {"background": 0, "a": 1}, origin_dataset=origin)
    groups = {"l1": "labeled", "u1": "unlabeled", "u2": "unlabeled", "t1": "test"}
    for case, group in groups.items():
        lab = np.zeros((6, 6, 6), np.uint8)
        lab[2:4, 2:4, 2:4] = 1
        w.add_case(case, group, rng.random((6, 6, 6)).astype(np.float32), lab if group != "unlabeled" else None,
                   spacing=(1.0, 1.0, 1.0))
    for case, fields in (metadata or {}).items():
        w.metadata.set(case, **fields)
    if extra_case:
        w.metadata.set(extra_case, domain="A")
    w.metadata.target_domain = "B" if metadata else None
    split = SemiSplit(labeled=["l1"], unlabeled=["u1", "u2"], test=["t1"], setting="tiny")
    return w.finish(split)


def test_writer_records_origin_and_per_case_fields(tmp_path):
    folder = write_tiny_dataset(tmp_path, metadata={"u1": {"domain": "B", "centre": 3}})
    md = load_case_metadata(folder)
    assert md.target_domain == "B"
    assert md.get("u1") == {"domain": "B", "centre": 3, "origin_dataset": "Tiny"}
    assert {c: md.get(c)["origin_dataset"] for c in md.cases} == {c: "Tiny" for c in ("l1", "u1", "u2", "t1")}


def test_writer_without_metadata_writes_no_file(tmp_path):
    folder = write_tiny_dataset(tmp_path, origin=None)
    assert not os.path.exists(os.path.join(folder, CASE_METADATA_FILE))
    assert load_case_metadata(folder) is None


def test_writer_refuses_metadata_of_a_case_not_written(tmp_path):
    with pytest.raises(ConversionError, match=r"case_metadata.json: case\(s\) \['ghost'\] are not in the split"):
        write_tiny_dataset(tmp_path, extra_case="ghost")


# ------------------------------------------------------------------------------ preprocessed side
def fake_preprocessed_cases(folder, ids, seg=True):
    """Empty files named like nnU-Net's Blosc2 cases (enough for the identifier listings)."""
    os.makedirs(folder, exist_ok=True)
    for i in ids:
        for suffix in (".b2nd", ".pkl") + (("_seg.b2nd",) if seg else ()):
            open(os.path.join(folder, i + suffix), "w").close()


def test_lookup_by_the_keys_nnunet_uses(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_semi.data.loader import locate_unlabeled

    raw_root = tmp_path / "raw"
    folder = write_tiny_dataset(raw_root, metadata={"l1": {"domain": "A"}, "u1": {"domain": "B"},
                                                     "u2": {"domain": "B"}})
    md = load_case_metadata(folder)
    pre = str(tmp_path / "pre" / os.path.basename(folder))
    fake_preprocessed_cases(os.path.join(pre, "nnUNetPlans_3d_fullres"), ["l1"])
    fake_preprocessed_cases(os.path.join(pre, "nnUNetPlans_3d_fullres_unlabeled"), ["u1", "u2"])
    labeled_ids = nnUNetDatasetBlosc2.get_identifiers(os.path.join(pre, "nnUNetPlans_3d_fullres"))
    _, unlabeled_ids = locate_unlabeled(pre, {}, "3d_fullres", "nnUNetPlans_3d_fullres", os.path.basename(folder),
                                        labeled_ids)
    # nnUNetDataLoader's batch["keys"]: np.random.choice over the identifiers, an array of numpy strings
    labeled_keys = np.random.default_rng(0).choice(labeled_ids, 3)
    unlabeled_keys = np.random.default_rng(0).choice(unlabeled_ids, 4)
    assert isinstance(labeled_keys[0], np.str_)
    assert [md.domain_of(k) for k in labeled_keys] == ["A"] * 3
    assert [md.domain_of(k) for k in unlabeled_keys] == ["B"] * 4
    assert all(md.get(k)["origin_dataset"] == "Tiny" for k in unlabeled_keys)


def test_find_case_metadata_prefers_the_raw_folder(tmp_path, monkeypatch):
    raw_root = tmp_path / "raw"
    folder = write_tiny_dataset(raw_root, metadata={"l1": {"domain": "A"}})
    pre = str(tmp_path / "pre" / os.path.basename(folder))
    os.makedirs(pre)
    copy = CaseMetadata()
    copy.set("l1", domain="from the copy")
    with open(os.path.join(pre, CASE_METADATA_FILE), "w") as f:
        json.dump(copy.to_json(), f)

    monkeypatch.setenv("nnUNet_raw", str(raw_root))
    assert raw_dataset_folder_of(pre) == folder and raw_dataset_folder_of(pre + "/") == folder
    assert find_case_metadata(pre).domain_of("l1") == "A"
    # raw folder available but without the file: the raw dataset is authoritative
    os.remove(os.path.join(folder, CASE_METADATA_FILE))
    assert find_case_metadata(pre) is None
    # raw folder not available (variable unset, or no such dataset there): the preprocessed copy
    monkeypatch.delenv("nnUNet_raw")
    assert raw_dataset_folder_of(pre) is None and find_case_metadata(pre).domain_of("l1") == "from the copy"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "elsewhere"))
    assert raw_dataset_folder_of(pre) is None and find_case_metadata(pre).domain_of("l1") == "from the copy"


def test_preprocess_unlabeled_copies_the_metadata(tmp_path, monkeypatch):
    """nnUNetv2_preprocess_unlabeled validates the raw file and mirrors it into the preprocessed folder
    (no configuration given, so no nnU-Net preprocessing runs)."""
    import nnunetv2.paths

    from nnunet_semi.data.unlabeled import preprocess_unlabeled

    raw_root, pre_root = tmp_path / "raw", tmp_path / "pre"
    folder = write_tiny_dataset(raw_root, metadata={"u1": {"domain": "B"}})
    name = os.path.basename(folder)
    pre = os.path.join(str(pre_root), name)
    os.makedirs(pre)
    json.dump({"image_reader_writer": "SimpleITKIO", "configurations": {}}, open(os.path.join(pre, "nnUNetPlans.json"),
                                                                                 "w"))
    json.dump(json.load(open(os.path.join(folder, "dataset.json"))), open(os.path.join(pre, "dataset.json"), "w"))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_raw", str(raw_root))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(pre_root))
    monkeypatch.delenv("nnUNet_raw", raising=False)

    copy = os.path.join(pre, CASE_METADATA_FILE)
    assert preprocess_unlabeled(name, configurations=[], verbose=False) == {}
    assert open(copy).read() == open(os.path.join(folder, CASE_METADATA_FILE)).read()
    assert find_case_metadata(pre).domain_of("u1") == "B"  # nnUNet_raw unset: the copy
    # an invalid raw file stops the command and leaves the copy as it was
    bad = json.load(open(os.path.join(folder, CASE_METADATA_FILE)))
    bad["cases"]["ghost"] = {"domain": "B"}
    json.dump(bad, open(os.path.join(folder, CASE_METADATA_FILE), "w"))
    before = open(copy).read()
    with pytest.raises(LayoutError, match=r"case\(s\) \['ghost'\] are not in the split"):
        preprocess_unlabeled(name, configurations=[], verbose=False)
    assert open(copy).read() == before
    # the raw dataset no longer has metadata: the stale copy goes
    os.remove(os.path.join(folder, CASE_METADATA_FILE))
    preprocess_unlabeled(name, configurations=[], verbose=False)
    assert not os.path.exists(copy) and find_case_metadata(pre) is None
