"""Validates FHIR R4 JSON resources with fhir.resources (an independent FHIR model
library), one file per argument. Exits 1 naming every file that fails, 2 if the
library is missing or is not FHIR R4 (4.0.1). Used by node/tests/node/fhir_api.rs;
installed by scripts/deps/python-fhir.sh."""
import json
import sys

try:
    import fhir.resources as fr
    from fhir.resources import construct_fhir_element
except ImportError as e:  # pragma: no cover
    print(f"fhir.resources is not installed: {e} (run scripts/deps/python-fhir.sh)")
    sys.exit(2)

if fr.__fhir_version__ != "4.0.1":
    print(f"fhir.resources models FHIR {fr.__fhir_version__}, not R4 4.0.1")
    sys.exit(2)

# fhir.resources checks structure, types, cardinality and primitive formats but
# not value-set bindings; the codes this project emits for required bindings are
# checked here against the R4 (4.0.1) value sets.
REQUIRED_CODES = {
    ("Task", "status"): {"draft", "requested", "received", "accepted", "rejected", "ready", "cancelled",
                         "in-progress", "on-hold", "failed", "completed", "entered-in-error"},
    ("Task", "intent"): {"unknown", "proposal", "plan", "order", "original-order", "reflex-order",
                         "filler-order", "instance-order", "option"},
    ("ServiceRequest", "status"): {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error",
                                   "unknown"},
    ("ServiceRequest", "intent"): {"proposal", "plan", "directive", "order", "original-order", "reflex-order",
                                   "filler-order", "instance-order", "option"},
    ("ServiceRequest", "priority"): {"routine", "urgent", "asap", "stat"},
    ("Task", "priority"): {"routine", "urgent", "asap", "stat"},
    ("DiagnosticReport", "status"): {"registered", "partial", "preliminary", "final", "amended", "corrected",
                                     "appended", "cancelled", "entered-in-error", "unknown"},
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                                "entered-in-error", "unknown"},
    ("AuditEvent", "action"): {"C", "R", "U", "D", "E"},
    ("AuditEvent", "outcome"): {"0", "4", "8", "12"},
    ("Bundle", "type"): {"document", "message", "transaction", "transaction-response", "batch",
                         "batch-response", "history", "searchset", "collection"},
}


def check_codes(resource):
    """Yields the required-binding codes of `resource` (and bundle entries) that are not in R4's value set."""
    kind = resource.get("resourceType")
    for (rtype, field), allowed in REQUIRED_CODES.items():
        if rtype == kind and field in resource and resource[field] not in allowed:
            yield f"{kind}.{field} = {resource[field]!r} is not in the R4 value set"
    for entry in resource.get("entry", []) if kind == "Bundle" else []:
        yield from check_codes(entry.get("resource", {}))


failed = 0
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    try:
        resource = construct_fhir_element(data["resourceType"], data)
        # Round-trip: what the model serialises must parse again.
        construct_fhir_element(data["resourceType"], json.loads(resource.json()))
        bad_codes = list(check_codes(data))
        if bad_codes:
            raise ValueError("; ".join(bad_codes))
        print(f"ok {path} {data['resourceType']}")
    except Exception as e:  # noqa: BLE001 -- report every failure
        failed += 1
        print(f"INVALID {path} {data.get('resourceType')}: {e}")
sys.exit(1 if failed else 0)
