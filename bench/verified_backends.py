"""Which kernels a GPU test run verified, from its JUnit XML: the entry of
`dit8.kernels.registry.GPU_VERIFIED` for the GPU that ran it.

    python bench/verified_backends.py tests.xml [--capability 9.0]

Tests marked `verifies(...)` record on a GPU the (op, backend) kernels they check (tests/conftest.py).
A kernel is verified when at least one of its tests passed and none failed or errored; skipped and
expected-failure tests count neither way. Prints a table and the line to paste into GPU_VERIFIED.
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from fastest_backends import capability  # bench/, beside this script


def outcomes(junit_xml: Path) -> dict[tuple[str, str], collections.Counter]:
    """(op, backend) -> Counter of the outcomes ("passed", "failed", "skipped") of the tests naming it."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(junit_xml).iter("testcase"):
        names = [p.get("value", "") for p in case.iter("property") if p.get("name") == "verifies"]
        if not names:
            continue
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        for pair in ",".join(names).split(","):
            op, _, backend = pair.partition(":")
            counts[(op, backend)][outcome] += 1
    return counts


def verified(counts: dict[tuple[str, str], collections.Counter]) -> set[tuple[str, str]]:
    return {pair for pair, c in counts.items() if c["passed"] > 0 and c["failed"] == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit_xml", type=Path, help="pytest --junitxml output of a GPU run")
    parser.add_argument("--capability", help="MAJOR.MINOR of the GPU that ran it (default: this GPU's)")
    args = parser.parse_args(argv)
    major, minor = capability(parser, args.capability)
    try:
        counts = outcomes(args.junit_xml)
    except (OSError, ET.ParseError) as err:  # a run killed before pytest wrote its report
        print(f"{args.junit_xml}: cannot read the test report: {err}", file=sys.stderr)
        return 1
    if not counts:
        print(f"{args.junit_xml}: no test recorded a kernel it verifies (was it run on a GPU?)", file=sys.stderr)
        return 1
    good = verified(counts)
    print(f"{'op':<28}{'backend':<9}{'passed':>7}{'failed':>7}{'skipped':>8}  verified")
    for (op, backend), c in sorted(counts.items()):
        print(f"{op:<28}{backend:<9}{c['passed']:>7}{c['failed']:>7}{c['skipped']:>8}  "
              f"{'yes' if (op, backend) in good else 'no'}")
    print(f"\nGPU_VERIFIED[({major}, {minor})] = frozenset({{{', '.join(map(repr, sorted(good)))}}})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
