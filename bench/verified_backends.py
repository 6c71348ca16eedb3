"""Which kernels a GPU test run verified, from its JUnit XML: the entry of
`dit8.kernels.registry.GPU_VERIFIED` for the GPU that ran it.

    python bench/verified_backends.py tests.xml [--collected kernel_tests.json] [--capability 9.0]
                                      [--json verified.json]

Tests marked `verifies(...)` record on a GPU the (op, backend) kernels they check (tests/conftest.py).
A kernel is verified when at least one of its tests passed and none failed or errored; skipped and
expected-failure tests count neither way. With --collected (the map tests/conftest.py writes at
collection under DIT8_KERNEL_TESTS), a kernel is also verified only if every test naming it ran: a
run cut short, or a worker that crashed (its test is reported without the properties), then does not
vouch for kernels whose tests did not finish. Prints a table and the line to paste into GPU_VERIFIED;
--json also writes the verified kernels to a file, which the environment variable DIT8_VERIFIED hands
to "auto" on this machine in place of the registry's entry.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from fastest_backends import capability  # bench/, beside this script


def junit_id(nodeid: str) -> tuple[str, str]:
    """The (classname, name) pytest's JUnit XML gives the test `nodeid` ("tests/t.py::Class::test[p]"),
    mangled as pytest mangles it (the parameters are left alone)."""
    address, bracket, params = nodeid.partition("[")
    path, *inner, name = address.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *inner]), name + bracket + params


def outcomes(junit_xml: Path, collected: dict[str, list[str]] | None = None
             ) -> tuple[dict[tuple[str, str], collections.Counter], int]:
    """(op, backend) -> Counter of the outcomes ("passed", "failed", "skipped", "not run") of the tests
    naming it in their own properties (recorded only on a GPU), and the number of such tests. With
    `collected`, a test that failed without them (a crashed worker's) counts against the kernels the
    map gives it, and the map's tests missing from the report count as not run."""
    by_id = {junit_id(nodeid): kernels for nodeid, kernels in (collected or {}).items()}
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    reported, recorded = set(), 0
    for case in ET.parse(junit_xml).iter("testcase"):
        if not case.get("name"):  # the test running when the run was interrupted: no outcome
            continue
        test = (case.get("classname", ""), case.get("name", ""))
        reported.add(test)
        names = [p.get("value", "") for p in case.iter("property") if p.get("name") == "verifies"]
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        recorded += bool(names)
        kernels = ",".join(names).split(",") if names else by_id.get(test, []) if outcome == "failed" else []
        for kernel in kernels:
            counts[_op_backend(kernel)][outcome] += 1
    for test, kernels in by_id.items():
        if test not in reported:
            for kernel in kernels:
                counts[_op_backend(kernel)]["not run"] += 1
    return counts, recorded


def _op_backend(kernel: str) -> tuple[str, str]:
    """"op:backend", as tests name a kernel, as a pair."""
    op, _, backend = kernel.partition(":")
    return op, backend


def verified(counts: dict[tuple[str, str], collections.Counter]) -> set[tuple[str, str]]:
    return {pair for pair, c in counts.items() if c["passed"] > 0 and c["failed"] == 0 and c["not run"] == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("junit_xml", type=Path, help="pytest --junitxml output of a GPU run")
    parser.add_argument("--collected", type=Path, help="the kernels of every collected test (DIT8_KERNEL_TESTS)")
    parser.add_argument("--capability", help="MAJOR.MINOR of the GPU that ran it (default: this GPU's)")
    parser.add_argument("--json", type=Path, help="also write the verified kernels here (for DIT8_VERIFIED)")
    args = parser.parse_args(argv)
    major, minor = capability(parser, args.capability)
    collected = None
    if args.collected is not None:
        try:
            collected = json.loads(args.collected.read_text())
        except (OSError, ValueError) as err:
            print(f"{args.collected}: cannot read the collected tests: {err}", file=sys.stderr)
            return 1
    try:
        counts, recorded = outcomes(args.junit_xml, collected)
    except (OSError, ET.ParseError) as err:  # a run killed before pytest wrote its report
        print(f"{args.junit_xml}: cannot read the test report: {err}", file=sys.stderr)
        return 1
    if not recorded:
        print(f"{args.junit_xml}: no test recorded a kernel it verifies (was it run on a GPU?)", file=sys.stderr)
        return 1
    good = verified(counts)
    print(f"{'op':<28}{'backend':<9}{'passed':>7}{'failed':>7}{'skipped':>8}{'not run':>8}  verified")
    for (op, backend), c in sorted(counts.items()):
        print(f"{op:<28}{backend:<9}{c['passed']:>7}{c['failed']:>7}{c['skipped']:>8}{c['not run']:>8}  "
              f"{'yes' if (op, backend) in good else 'no'}")
    print(f"\nGPU_VERIFIED[({major}, {minor})] = frozenset({{{', '.join(map(repr, sorted(good)))}}})")
    if args.json is not None:
        args.json.write_text(json.dumps({"capability": [major, minor], "verified": sorted(good)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
