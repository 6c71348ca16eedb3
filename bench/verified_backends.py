"""Which kernels a GPU test run verified, from its JUnit XML: the entry of
`dit8.kernels.registry.GPU_VERIFIED` for the GPU that ran it.

    python bench/verified_backends.py tests.xml [--collected kernel_tests.json] [--capability 9.0]
                                      [--json verified.json] [--outcomes test_outcomes.jsonl]

Tests marked `verifies(...)` record on a GPU the (op, backend) kernels they check (tests/conftest.py).
A kernel is verified when at least one of its tests passed and none failed or errored; skipped and
expected-failure tests count neither way. With --collected (the map tests/conftest.py writes at
collection under DIT8_KERNEL_TESTS), a kernel is also verified only if every test naming it ran: a
run cut short, or a worker that crashed (its test is reported without the properties), then does not
vouch for kernels whose tests did not finish. Prints a table and the line to paste into GPU_VERIFIED;
--json also writes the verified kernels to a file, which the environment variable DIT8_VERIFIED hands
to "auto" on this machine in place of the registry's entry. --outcomes names the log tests/conftest.py
writes as each test ends (DIT8_TEST_OUTCOMES), read where the JUnit XML cannot be: pytest writes that
only after its workers shut down, and a run stopped then leaves none.
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


# A test's outcome in a report: (JUnit classname, name), the kernels it recorded, "passed", "failed" or
# "skipped" (expected failures too, as pytest's JUnit XML has them).
Case = tuple[tuple[str, str], list[str], str]


def junit_cases(junit_xml: Path) -> list[Case]:
    """The tests of a JUnit XML report (OSError or ET.ParseError where it cannot be read)."""
    cases = []
    for case in ET.parse(junit_xml).iter("testcase"):
        if not case.get("name"):  # the test running when the run was interrupted: no outcome
            continue
        names = [p.get("value", "") for p in case.iter("property") if p.get("name") == "verifies"]
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        cases.append(((case.get("classname", ""), case.get("name", "")), names, outcome))
    return cases


def logged_cases(log: Path) -> list[Case]:
    """The tests of a DIT8_TEST_OUTCOMES log, one line per phase (OSError or ValueError where it cannot be
    read): failed where a phase failed (a crashed worker's test too), else skipped where one was skipped,
    else passed once its call passed; a test stopped before that has no outcome, as in the JUnit XML."""
    phases: dict[str, list[dict]] = collections.defaultdict(list)
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        phases[entry["nodeid"]].append(entry)
    cases = []
    for nodeid, entries in phases.items():
        seen = {(e["when"], e["outcome"]) for e in entries}
        outcomes = {outcome for _, outcome in seen}
        outcome = "failed" if "failed" in outcomes else "skipped" if "skipped" in outcomes else \
            "passed" if ("call", "passed") in seen else None
        if outcome is not None:
            names = list(dict.fromkeys(name for e in entries for name in e["verifies"]))
            cases.append((junit_id(nodeid), names, outcome))
    return cases


def outcomes(cases: list[Case], collected: dict[str, list[str]] | None = None
             ) -> tuple[dict[tuple[str, str], collections.Counter], int]:
    """(op, backend) -> Counter of the outcomes ("passed", "failed", "skipped", "not run") of the tests
    naming it in their own properties (recorded only on a GPU), and the number of such tests. With
    `collected`, a test that failed without them (a crashed worker's) counts against the kernels the
    map gives it, and the map's tests missing from the report count as not run."""
    by_id = {junit_id(nodeid): kernels for nodeid, kernels in (collected or {}).items()}
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    reported, recorded = set(), 0
    for test, names, outcome in cases:
        reported.add(test)
        recorded += bool(names)
        kernels = ",".join(names).split(",") if names else by_id.get(test, []) if outcome == "failed" else []
        for kernel in kernels:
            counts[_op_backend(kernel)][outcome] += 1
    for test, kernels in by_id.items():
        if test not in reported:
            for kernel in kernels:
                counts[_op_backend(kernel)]["not run"] += 1
    return counts, recorded


def read_cases(junit_xml: Path, log: Path | None = None) -> list[Case]:
    """The tests of the JUnit XML report, or where it cannot be read, of the `log` (DIT8_TEST_OUTCOMES), with
    a line on stderr saying so; the report's error where neither can be read."""
    try:
        return junit_cases(junit_xml)
    except (OSError, ET.ParseError) as err:
        if log is None:
            raise
        try:
            cases = logged_cases(log)
        except (OSError, ValueError, KeyError, TypeError):
            raise err from None
        print(f"{junit_xml}: cannot read the test report ({err}); the outcomes come from {log}", file=sys.stderr)
        return cases


# The Gluon candidates (kernels/scaled_mm_gluon.py) and their tests: the in-place accumulation kernel's
# have "fast" (FP8) or "int8" in their names.
GLUON_TESTS = {"gemm": ("test_scaled_mm_gluon", lambda name: "fast" not in name and "int8" not in name),
               "gemm_fast": ("test_scaled_mm_gluon", lambda name: "fast" in name),
               "gemm_int8": ("test_scaled_mm_gluon", lambda name: "int8" in name)}


def untested_gluon(cases: list[Case], collected: dict[str, list[str]]) -> list[str]:
    """The Gluon candidates a test run did not show to work (bench/gpu_check.sh keeps them out of its
    benchmarks: DIT8_SKIP_GLUON). Shown: every one of its GPU tests (`collected`, the DIT8_KERNEL_TESTS map,
    which holds every test marked `gpu`) ran, at least one passed, and none of its tests failed. A test
    that passes on any machine (an argument check) vouches for nothing, nor does a run cut short before
    the GPU tests, or one on a GPU the kernel does not run on (its tests skip)."""
    outcome_of = {test: outcome for test, _, outcome in cases}
    untested = []
    for name, (module, owns) in GLUON_TESTS.items():
        def mine(test: tuple[str, str]) -> bool:
            return test[0].endswith(module) and owns(test[1])

        gpu = [outcome_of.get(test) for test in map(junit_id, collected) if mine(test)]
        if "passed" not in gpu or None in gpu or any(o == "failed" for t, o in outcome_of.items() if mine(t)):
            untested.append(name)
    return untested


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
    parser.add_argument("--outcomes", type=Path,
                        help="the tests' outcome log (DIT8_TEST_OUTCOMES), read where the JUnit XML cannot be")
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
        counts, recorded = outcomes(read_cases(args.junit_xml, args.outcomes), collected)
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
