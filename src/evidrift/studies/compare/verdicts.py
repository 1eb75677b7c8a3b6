"""Machine-readable verdicts of ``evidrift compare``: ``--json FILE`` and ``--junit FILE``, atomic writes.

Both are rendered from the same list of ``compare_gates.Verdict`` as the console table, so they agree with
what is printed. JSON: ``{"passed", "exit_code", "n_images", "a", "b", "band", "alpha", "tolerance",
"report", "gates": [one object per verdict: name, gate, metric, method, arch, n, value, ci_low, ci_high,
threshold, band_kind, band_mean, band_ci_low, band_ci_high, tolerance, p, p_holm, alpha, passed, message,
statistic]}`` (NaN written as null). JUnit XML in the common schema that GitLab, Jenkins and GitHub's test
reporters read: ``<testsuites><testsuite name tests failures errors skipped time timestamp><properties/>
<testcase classname name time>[<failure message type>text</failure>]<system-out/></testcase>...``, one
testcase per verdict (classname ``evidrift.compare.{arch}.{method}``, name ``{gate} {metric}``).
"""

from __future__ import annotations

import datetime as _dt
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evidrift.core.io import write_json_atomic, write_text_atomic
from evidrift.studies.compare.gates import Verdict


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """0 when every verdict passed (or there is none), 1 when one failed."""
    return 0 if all(v.passed for v in verdicts) else 1


def verdicts_document(verdicts: Sequence[Verdict], context: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` document: ``context`` (a, b, band, n_images, alpha, ...) + passed, exit_code, gates."""
    return {
        **dict(context),
        "passed": exit_code(verdicts) == 0,
        "exit_code": exit_code(verdicts),
        "n_gates": len(verdicts),
        "n_failed": sum(not v.passed for v in verdicts),
        "gates": [v.to_dict() for v in verdicts],
    }


def junit_xml(verdicts: Sequence[Verdict], context: Mapping[str, Any], seconds: float = 0.0) -> str:
    """The ``--junit`` document (module docstring) as a UTF-8 XML string with its declaration."""
    failures = sum(not v.passed for v in verdicts)
    counts = {"tests": str(len(verdicts)), "failures": str(failures), "errors": "0", "skipped": "0"}
    suites = ET.Element("testsuites", {"name": "evidrift compare", **counts, "time": f"{seconds:.3f}"})
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            "name": f"evidrift compare {_name(context, 'a')} → {_name(context, 'b')}",
            **counts,
            "time": f"{seconds:.3f}",
            "timestamp": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    properties = ET.SubElement(suite, "properties")
    for key, value in context.items():
        if value is not None and not isinstance(value, (dict, list)):
            ET.SubElement(properties, "property", {"name": str(key), "value": str(value)})
    for verdict in verdicts:
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": f"evidrift.compare.{verdict.arch}.{verdict.method}",
                "name": f"{verdict.gate} {verdict.metric}",
                "time": "0",
            },
        )
        if not verdict.passed:
            failure = ET.SubElement(case, "failure", {"message": verdict.message, "type": "ExplanationDrift"})
            failure.text = verdict.message
        out = ET.SubElement(case, "system-out")
        out.text = verdict.message
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _name(context: Mapping[str, Any], key: str) -> str:
    return Path(str(context.get(key) or key.upper())).name


def write_verdicts(
    verdicts: Sequence[Verdict],
    context: Mapping[str, Any],
    json_path: str | os.PathLike[str] | None = None,
    junit_path: str | os.PathLike[str] | None = None,
    seconds: float = 0.0,
) -> None:
    """Write the JSON and/or JUnit files (each atomically: temp file + rename)."""
    if json_path is not None:
        write_json_atomic(json_path, verdicts_document(verdicts, context))
    if junit_path is not None:
        write_text_atomic(junit_path, junit_xml(verdicts, context, seconds))


def verdict_rows(verdicts: Sequence[Verdict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the console's verdict table: gate, metric, method, A → B, threshold / band, p
    (Holm), verdict."""
    header = ["gate", "metric", "method", "A → B mean [95% CI]", "threshold / band", "p (Holm)", "verdict"]
    rows = []
    for v in verdicts:
        value = f"{v.value:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}]"
        if v.gate == "fail-beyond-band":
            reference = (
                f"band {v.band_mean:.3f} [{v.band_ci_low:.3f}, {v.band_ci_high:.3f}], edge {v.threshold:.3f}"
            )
            p = f"{v.p:.3g} ({v.p_holm:.3g})"
        else:
            reference = f"{'≥' if v.gate == 'fail-below' else '≤'} {v.threshold:g}"
            p = "—"
        metric = f"|{v.metric}|" if v.statistic != "mean" else v.metric
        rows.append([v.gate, metric, v.method, value, reference, p, "PASS" if v.passed else "FAIL"])
    return header, rows
