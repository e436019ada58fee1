"""Record benchmark folders into the repository: their settings, wall times and per-case evaluations, merged
with what is recorded already, and ``results.md`` / ``results.json`` rebuilt over all recorded seeds.

    python benchmarks/record.py runs/curve_104_2d_80x50_val runs/h104_2d_80x50_test [--into benchmarks/records]
    python benchmarks/record.py runs/h104_2d_80x50_test --commit a35622a     # the runs' code, when settings.json
                                                                            # says 'unknown' (a frozen copy)
    python benchmarks/record.py --rebuild benchmarks/records/curve_104_2d_80x50_val
    python benchmarks/record.py runs/rlckpt_104_2d_80x50_val --name curve_104_2d_80x50_val \
        --rename ReciprocalLearningTrainer=ReciprocalLearningTrainer_fromSupervised \
        --note "teacher from the same seed's supervised checkpoint"     # an arm of its own folder, recorded beside
                                                                        # the others under a new name

A benchmark folder is lost with the machine that ran it; its record (a few hundred kB) is what RESULTS.md's
numbers can be re-derived from, and where seeds trained in different sessions meet: recording a folder adds its
(arm, seed) runs and keeps the record's others. A folder of other key settings, or an (arm, seed) evaluated
differently from its record (a re-run), is refused unless ``--replace``; nothing is written then.
``benchmarks/learning_curve.py`` and ``--rebuild`` read records as benchmark folders.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(HERE))
    from nnunet_semi.benchmark.records import RecordError, rebuild_report, record_folder
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="benchmark folders (run_benchmark.py -o)")
    p.add_argument("--into", default=os.path.join(HERE, "records"),
                   help="records folder (default benchmarks/records)")
    p.add_argument("--name", default=None, help="the record's name (default: the folder's name; one folder only)")
    p.add_argument("--replace", action="store_true",
                   help="take the folder's evaluation of an (arm, seed) the record holds with other results")
    p.add_argument("--commit", default=None,
                   help="the commit the folders' runs were trained with, recorded when their settings.json has none")
    p.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW",
                   help="record the folder's arm OLD as NEW (ARM@export arms follow their arm unless named)")
    p.add_argument("--note", default=None, help="what the renamed arms did differently (kept in the record)")
    p.add_argument("--rebuild", nargs="+", default=None, metavar="RECORD",
                   help="only rebuild results.md / results.json of these records from their evaluations")
    a = p.parse_args(argv)
    if not a.folders and not a.rebuild:
        p.error("give benchmark folders to record, or --rebuild RECORD")
    if a.name and len(a.folders) > 1:
        p.error("--name takes one folder")
    rename = {}
    for item in a.rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            p.error(f"--rename takes OLD=NEW, not {item!r}")
        rename[old] = new
    if rename and len(a.folders) != 1:
        p.error("--rename takes one folder")
    try:
        for record in a.rebuild or []:
            agg = rebuild_report(record)
            seeds = ", ".join(f"{m} seeds {agg['seeds'][m]}" for m in agg["methods"])
            print(f"rebuilt {record}: {seeds}")
        for folder in a.folders:
            changes = record_folder(folder, a.into, name=a.name, replace=a.replace, commit=a.commit,
                                    rename=rename or None, note=a.note)
            print("\n".join(changes.lines()))
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
