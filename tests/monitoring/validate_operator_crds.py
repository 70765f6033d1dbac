#!/usr/bin/env python3
"""Validates prometheus-operator objects against the operator's CRD schemas.

Reads a JSON list of objects on stdin; prints `valid: Kind/name` for each
one that passes and the problems of each one that does not (exit 1).

The schemas are cloudcoil-models-prometheus-operator's pydantic models,
generated from the operator's CRDs: they check every field's type. They
ignore fields they do not know, so an object passes only when its
validated model, written back, is the object itself: a misspelled or
unknown field is dropped on the way and named here.
"""

import json
import sys

import pydantic
from cloudcoil.models.prometheus_operator import v1

API_VERSION = "monitoring.coreos.com/v1"
KINDS = {
    "PodMonitor": v1.PodMonitor,
    "ServiceMonitor": v1.ServiceMonitor,
    "PrometheusRule": v1.PrometheusRule,
}


def unknown_fields(given, kept, path=""):
    """Where `given` holds something the model did not keep."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else key
            if key not in kept:
                yield where
            else:
                yield from unknown_fields(value, kept[key], where)
    elif isinstance(given, list) and isinstance(kept, list):
        for index, (item, kept_item) in enumerate(zip(given, kept)):
            yield from unknown_fields(item, kept_item, f"{path}[{index}]")


def problems(obj):
    kind = obj.get("kind")
    if obj.get("apiVersion") != API_VERSION or kind not in KINDS:
        return [f"not a {API_VERSION} {'/'.join(KINDS)}: {obj.get('apiVersion')} {kind}"]
    try:
        model = KINDS[kind].model_validate(obj)
    except pydantic.ValidationError as err:
        return [str(err)]
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"unknown field {where}" for where in unknown_fields(obj, kept)]


def main():
    failed = False
    for obj in json.load(sys.stdin):
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        found = problems(obj)
        if found:
            failed = True
            print(f"invalid: {name}")
            for problem in found:
                print(f"  {problem}")
        else:
            print(f"valid: {name}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
