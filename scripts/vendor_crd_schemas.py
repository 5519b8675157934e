"""Extract the openAPIV3Schema of CustomResourceDefinitions into tests/schemas/ as compact JSON.

The deploy/ manifests use custom resources (KServe ClusterServingRuntime and InferenceService,
KEDA ScaledObject) that kubernetes-validate has no schema for. tests/deploy validates them
against the schemas the real projects publish in their CRDs; this script is how those files
were made, so a newer CRD can replace them the same way:

    python scripts/vendor_crd_schemas.py --out tests/schemas path/to/crd.yaml [...]

Each served version of each CRD becomes `<group>_<kind>_<version>.json` (kind lower-cased), the
schema unchanged apart from formatting. Record the source repository, commit and path in
tests/schemas/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def schema_files(crd: dict) -> dict[str, dict]:
    """{file name: openAPIV3Schema} for every served version of one CRD."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: {crd.get('kind')!r}")
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"].lower()
    out = {}
    for version in spec["versions"]:
        if version.get("served", True):
            out[f"{group}_{kind}_{version['name']}.json"] = version["schema"]["openAPIV3Schema"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("crds", nargs="+", type=Path, help="CRD YAML files")
    a = parser.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for path in a.crds:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            for name, schema in schema_files(doc).items():
                text = json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n"
                (a.out / name).write_text(text)
                print(f"{path} -> {a.out / name} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
