#!/usr/bin/env python3
"""Checks OCSF events, one JSON object per line, against the official schema.

The schema is OCSF's own compiled export, as PyPI `ocsf-json-schema` bundles
it (pinned by `cargo xtask setup`); nothing is fetched. For each event it
builds a strict JSON Schema (draft 2020-12) of the event's class with the
profiles the event declares in `metadata.profiles`, so an attribute the
class or an object does not define, a missing required attribute, a wrong
type and a value outside an enum all fail. Two rules the schema does not
state are checked too: `type_uid` is `class_uid * 100 + activity_id`, and
`metadata.version` is the version checked against.

Usage: ocsf_validate.py FILE...   (`-` for standard input)
Prints each error as `FILE:LINE: PATH: MESSAGE`, then a count of the events
by class; exits 1 on any error, or when there is no event at all.
"""

import collections
import functools
import json
import sys

from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

OCSF_VERSION = "1.8.0"  # the agent's observe::ocsf::OCSF_VERSION


@functools.cache
def schema_export():
    return OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))


@functools.cache
def validator(class_uid, profiles):
    ocsf = schema_export()
    schema = ocsf.get_class_schema(class_name=ocsf.lookup_class_name_from_uid(class_uid), profiles=list(profiles))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(event):
    if not isinstance(event, dict):
        return ["<root>: not an object"]
    class_uid = event.get("class_uid")
    if type(class_uid) is not int:
        return ["class_uid: missing, or not an integer"]
    metadata = event.get("metadata") if isinstance(event.get("metadata"), dict) else {}
    profiles = metadata.get("profiles", [])
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        return ["metadata/profiles: not a list of names"]
    try:
        checker = validator(class_uid, tuple(sorted(set(profiles))))
    except ValueError as error:
        return [f"class_uid: {error}"]
    found = []
    for error in sorted(checker.iter_errors(event), key=lambda e: [str(p) for p in e.absolute_path]):
        found.append(f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}")
    activity_id, type_uid = event.get("activity_id"), event.get("type_uid")
    if type(activity_id) is int and type(type_uid) is int and type_uid != class_uid * 100 + activity_id:
        found.append(f"type_uid: {type_uid} is not class_uid * 100 + activity_id")
    if metadata.get("version") != OCSF_VERSION:
        found.append(f"metadata/version: {metadata.get('version')!r}, checked against {OCSF_VERSION}")
    return found


def main(paths):
    failed = 0
    classes = collections.Counter()
    for path in paths:
        with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as error:
                    found = [f"<line>: not JSON: {error}"]
                else:
                    found = errors(event)
                    classes[event.get("class_uid") if isinstance(event, dict) else None] += 1
                for error in found:
                    print(f"{path}:{number}: {error}")
                failed += bool(found)
    total = sum(classes.values())
    print(f"{total - failed} of {total} events valid (OCSF {OCSF_VERSION}); by class_uid: "
          + json.dumps({str(uid): count for uid, count in sorted(classes.items(), key=str)}))
    return 1 if failed or not total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["-"]))
