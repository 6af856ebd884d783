"""Record which kernel forms passed the compiled correctness run on this GPU (`carajax.autotune`).

    python scripts/record_verified.py --junit tests.xml [--out PATH ...] [--base PATH]

Reads pytest's JUnit XML of the compiled test classes (`scripts/gpu_check.sh` runs them with
`--junitxml`). A form is recorded for JAX's device kind when every class that tests it ran at
least one test and none failed, errored or was skipped; a form one of whose classes ran with a
failure is removed; a form whose classes did not run is left as it was. Off a GPU nothing is
recorded (the compiled classes skip there, and a device kind of "cpu" means nothing).

The record read is --base (default: the package's carajax/data/kernel_tables/verified.json);
the updated one is written to each --out (default: the repository's data/kernel_tables/ and the
package's copy, which tests/test_packaging.py keeps equal). Exits 0 whatever was recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from carajax import autotune
from carajax.lora import kernel_table

REPO = Path(__file__).resolve().parents[1]

# The compiled test class of each kernel form: (file, class) -> (op, forms). The GPU classes run
# the same suites as their interpret twins, compiled (tests/test_autotune.py checks they exist).
CHECKS = {
    ("tests/test_attention.py", "TestPagedAttentionKernelGPU"): ("attention", ("pallas",)),
    ("tests/test_kernels.py", "TestKernelsGPU"): ("lora", ("pallas", "padded")),
    ("tests/test_fused_kernels.py", "TestFusedGPU"): ("lora", ("fused",)),
}


def class_counts(junit_xml: str) -> dict[str, dict[str, int]]:
    """Per test class (the last part of a test case's classname): how many passed, failed
    (failures and errors) and were skipped."""
    counts: dict[str, dict[str, int]] = {}
    for case in ET.fromstring(junit_xml).iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        c = counts.setdefault(cls, {"passed": 0, "failed": 0, "skipped": 0})
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            c["failed"] += 1
        elif "skipped" in tags:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return counts


def form_results(counts: Mapping[str, Mapping[str, int]]
                 ) -> dict[str, tuple[dict[str, str], set[str]]]:
    """Per op: ({passed form: the check that passed it}, {failed forms}) from the class counts.
    A form passes only if all its classes ran cleanly; any failure fails it."""
    status: dict[tuple[str, str], list[tuple[str, bool | None]]] = {}
    for (path, cls), (op, forms) in CHECKS.items():
        c = counts.get(cls)
        if c is None or c["passed"] + c["failed"] + c["skipped"] == 0:
            ok = None  # did not run
        elif c["failed"]:
            ok = False
        elif c["skipped"] or not c["passed"]:
            ok = None  # skipped: not a compiled run
        else:
            ok = True
        for form in forms:
            label = f"{path}::{cls} ({c['passed']} passed)" if ok else ""
            status.setdefault((op, form), []).append((label, ok))
    out: dict[str, tuple[dict[str, str], set[str]]] = {op: ({}, set()) for op in autotune.OPS}
    for (op, form), results in status.items():
        oks = [ok for _, ok in results]
        if False in oks:
            out[op][1].add(form)
        elif all(ok is True for ok in oks):
            out[op][0][form] = "; ".join(label for label, _ in results)
    return out


def update(doc: Mapping, junit_xml: str, device_kind: str, provenance: Mapping) -> dict:
    """The record updated from one JUnit report of this device kind's compiled classes."""
    for op, (passed, failed) in form_results(class_counts(junit_xml)).items():
        for form, check in passed.items():
            doc = autotune.update_record(doc, device_kind, op, passed=[form],
                                         provenance={**provenance, "check": check})
        doc = autotune.update_record(doc, device_kind, op, failed=failed)
    return doc


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO).returncode
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", required=True, help="pytest --junitxml output")
    parser.add_argument("--base", default=str(autotune.RECORD_PATH), help="the record to update")
    parser.add_argument("--out", nargs="+", default=None,
                        help="where to write it (default: data/kernel_tables/verified.json and "
                             "carajax/data/kernel_tables/verified.json)")
    args = parser.parse_args()

    import jax

    doc = json.loads(Path(args.base).read_text())
    kind = jax.devices()[0].device_kind
    junit = Path(args.junit)
    if jax.default_backend() != "gpu":
        print(f"not on a GPU ({jax.default_backend()}): nothing recorded")
    elif not junit.is_file():
        print(f"no test report at {junit} (the tests did not finish): nothing recorded")
    else:
        doc = update(doc, junit.read_text(), kind, {
            "date": datetime.date.today().isoformat(), "commit": commit(),
            "jax": jax.__version__})
    outs = args.out or [str(kernel_table.SOURCE_DIR / "verified.json"),
                        str(kernel_table.TABLE_DIR / "verified.json")]
    text = json.dumps(doc, indent=2) + "\n"
    for out in outs:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    mine = {op: sorted(f) for op, f in autotune.verified_forms(kind, doc).items() if f}
    print(f"{kind}: verified {mine or 'nothing'}; wrote {', '.join(outs)}")


if __name__ == "__main__":
    main()
