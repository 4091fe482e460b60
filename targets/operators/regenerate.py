#!/usr/bin/env python3
"""Convert ONNX Runtime docs/OperatorKernels.md into per-provider YAML files.

Usage:
  python3 regenerate.py OperatorKernels.md --out-dir . [--source-url URL] [--commit SHA]

To regenerate from upstream (on a machine with network access):
  curl -LO https://raw.githubusercontent.com/microsoft/onnxruntime/<commit>/docs/OperatorKernels.md
  python3 regenerate.py OperatorKernels.md --out-dir . --commit <commit>

Output schema (one flow mapping per operator, valid for yaml.safe_load):
  provider: DmlExecutionProvider
  source: <url>
  domains:
    <domain>:
      <OpName>: {since: [..], types: {T: [..]}, [until: N], [types_by_since: {since: {T: [..]}}]}

  since          ascending list of the start opset of every registered kernel row
                 ("14+" -> 14, "[7, 12]" -> 7, "13" -> 13).
  until          present only when the newest row is a closed range (e.g. "9" or "[9, 10]"):
                 the op has no kernel for opsets above this value.
  types          type constraints of the NEWEST kernel row, "tensor(x)" unwrapped to "x";
                 other wrappers (seq(...), optional(...), map(...), sparse_tensor(...)) kept verbatim.
  types_by_since only present when older kernel rows list different constraints.
"""
import argparse
import json
import re
import sys
from collections import OrderedDict

import yaml

PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
YAML_SPECIAL = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE",
                "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF", "null", "Null",
                "NULL", "~"}


def parse_version(v):
    v = v.strip()
    m = re.fullmatch(r"(\d+)\+", v)
    if m:
        return int(m.group(1)), None
    m = re.fullmatch(r"\[(\d+),\s*(\d+)\]", v)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"(\d+)", v)
    if m:
        return int(m.group(1)), int(m.group(1))
    raise ValueError(f"bad version cell {v!r}")


def split_types(s):
    """Split 'tensor(a), seq(tensor(b)), map(int64,tensor(c))' at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def unwrap(t):
    m = re.fullmatch(r"tensor\(([A-Za-z0-9_]+)\)", t)
    return m.group(1) if m else t


def parse_types(cell):
    cons = OrderedDict()
    cell = cell.strip()
    if not cell:
        return cons
    for part in cell.split("<br/>"):
        part = part.strip()
        m = re.fullmatch(r"\*\*([^*]+)\*\*\s*=\s*(.*)", part)
        if not m:
            raise ValueError(f"bad type constraint {part!r}")
        cons[m.group(1)] = [unwrap(t) for t in split_types(m.group(2))]
    return cons


def parse_markdown(text):
    """-> {provider: {domain: {op: [ {start, end, types}, ... ]}}} in document order."""
    data = OrderedDict()
    provider = domain = op = None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^## Operators implemented by (\S+)", line)
        if m:
            provider, domain, op = m.group(1), None, None
            data[provider] = OrderedDict()
            continue
        if provider is None or not line.startswith("|"):
            continue
        m = re.match(r"^\|\*\*Operator Domain:\*\* \*([^*]+)\*\|", line)
        if m:
            domain = m.group(1)
            data[provider][domain] = OrderedDict()
            op = None
            continue
        if line.startswith("| Op Name") or line.startswith("|---") or line.strip() == "| |":
            continue
        cells = line.split("|")
        if len(cells) != 6 or cells[0] != "" or cells[5] != "":
            raise ValueError(f"line {lineno}: unexpected row shape ({len(cells)} cells): {line[:120]}")
        name, _params, ver, types = cells[1], cells[2], cells[3], cells[4]
        if name:
            op = name
            if op in data[provider][domain]:
                raise ValueError(f"line {lineno}: duplicate op {provider}/{domain}/{op}")
            data[provider][domain][op] = []
        if op is None or domain is None:
            raise ValueError(f"line {lineno}: row without op/domain")
        start, end = parse_version(ver)
        data[provider][domain][op].append({"start": start, "end": end, "types": parse_types(types)})
    return data


def summarize(rows):
    newest = max(rows, key=lambda r: r["start"])
    entry = OrderedDict()
    entry["since"] = sorted({r["start"] for r in rows})
    if newest["end"] is not None:
        entry["until"] = newest["end"]
    entry["types"] = newest["types"]
    if any(r["types"] != newest["types"] for r in rows):
        entry["types_by_since"] = OrderedDict((r["start"], r["types"]) for r in sorted(rows, key=lambda r: r["start"]))
    return entry


def scalar(x):
    if isinstance(x, int):
        return str(x)
    if PLAIN.match(x) and x not in YAML_SPECIAL:
        return x
    return json.dumps(x)  # JSON strings are valid YAML flow scalars


def flow(obj):
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{scalar(k) if not isinstance(k, int) else k}: {flow(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(flow(v) for v in obj) + "]"
    return scalar(obj)


def to_plain(obj):
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def emit(provider, domains, source, header):
    lines = [f"# {l}" if l else "#" for l in header]
    lines += [f"provider: {provider}", f"source: {json.dumps(source)}", "domains:"]
    expected = {"provider": provider, "source": source, "domains": {}}
    for dom, ops in domains.items():
        lines.append(f"  {scalar(dom)}:")
        expected["domains"][dom] = {}
        for opname in sorted(ops):
            entry = summarize(ops[opname])
            lines.append(f"    {scalar(opname)}: {flow(entry)}")
            expected["domains"][dom][opname] = to_plain(entry)
    text = "\n".join(lines) + "\n"
    # round-trip check: what safe_load sees must equal the data we meant to write
    loaded = yaml.safe_load(text)
    assert loaded == expected, "YAML round-trip mismatch"
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("markdown")
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--commit", default="001d12d2623fd411ce0f83d05abb5e82304a3389")
    ap.add_argument("--providers", default="CPUExecutionProvider=cpu,DmlExecutionProvider=dml")
    args = ap.parse_args()
    url = f"https://github.com/microsoft/onnxruntime/blob/{args.commit}/docs/OperatorKernels.md"
    data = parse_markdown(open(args.markdown, encoding="utf-8").read())
    for spec in args.providers.split(","):
        prov, short = spec.split("=")
        if prov not in data:
            print(f"skip {prov}: not in markdown", file=sys.stderr)
            continue
        header = [
            f"Operators the {prov} implements, from microsoft/onnxruntime docs/OperatorKernels.md at commit {args.commit},",
            f"{url}",
            "(newest stored version of that file; its CPU section has ONNX opset-25 kernels, i.e. newer than ORT 1.23 -- see NOTES.md).",
            "Regenerate: curl -LO https://raw.githubusercontent.com/microsoft/onnxruntime/<commit>/docs/OperatorKernels.md &&",
            "  python3 regenerate.py OperatorKernels.md --out-dir <dir> --commit <commit>",
            "since: start opset of every kernel row; until: only if newest row is a closed range;",
            "types: constraints of the newest row (tensor(x) -> x); types_by_since: only if older rows differ.",
            "Domains com.microsoft.nchwc / com.microsoft.dml hold ORT-internal fused ops (never in exported models).",
        ]
        text = emit(prov, data[prov], url, header)
        path = f"{args.out_dir}/{short}.yaml"
        open(path, "w", encoding="utf-8").write(text)
        n = sum(len(v) for v in data[prov].values())
        print(f"wrote {path}: {n} ops in {len(data[prov])} domains ({', '.join(f'{d}={len(v)}' for d, v in data[prov].items())})")


if __name__ == "__main__":
    main()
