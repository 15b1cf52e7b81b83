"""What a real kube-apiserver checks when a CustomResourceDefinition is created, offline.

``kubernetes-validate`` only checks a CRD's *shape* against the apiextensions OpenAPI schema; the
API server does much more in its CRD validation, and a CRD that fails there cannot be installed
at all. This module mirrors the checks that bit us or could bite us:

* protected groups (``k8s.io``, ``kubernetes.io`` and their subdomains; ``x-k8s.io`` is *not* one)
  need the ``api-approved.kubernetes.io`` annotation: a URL of the approving PR, or a value that
  starts with ``unapproved``;
* names: ``metadata.name`` is ``<plural>.<group>``, the group has a dot; exactly one storage
  version, unique version names;
* structural schemas: a ``type`` on every node (but ``x-kubernetes-int-or-string`` /
  ``x-kubernetes-preserve-unknown-fields``), ``object`` at the root, ``items`` on arrays, no
  ``additionalProperties`` next to ``properties``, no ``additionalProperties: false``, no
  ``uniqueItems: true``, no forbidden keywords, nothing but name/generateName restrictions under
  ``metadata``, no ``type``/``default``/... inside ``allOf``/``anyOf``/``oneOf``/``not``;
* list/map extensions: ``x-kubernetes-list-type: map`` needs ``x-kubernetes-list-map-keys`` naming
  scalar item fields that are required or defaulted; ``set`` lists hold scalars;
* defaults validate against their own schema (strictly: a default the server would prune is a bug);
* ``x-kubernetes-validations``: every rule and messageExpression compiles as CEL, refers only to
  ``self``/``oldSelf`` and comprehension variables, calls only functions the Kubernetes CEL
  environment declares, names only fields its schema node has, and uses ``oldSelf`` only where the
  server can correlate old and new values (not inside the items of a non-map list);
* printer columns: known types and formats, jsonPath starting with ``.``.

Not mirrored: the CEL cost budget (our rules are on lists with ``maxItems``), type-checking CEL
beyond field names, and format-specific value checks of defaults.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

APPROVAL_ANNOTATION = "api-approved.kubernetes.io"
SCALAR_TYPES = {"string", "integer", "number", "boolean"}
TYPES = SCALAR_TYPES | {"object", "array"}
FORBIDDEN_KEYS = {"$ref", "definitions", "dependencies", "deprecated", "discriminator", "id",
                  "patternProperties", "readOnly", "writeOnly", "xml", "additionalItems"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# keywords a value validation inside a junctor may not set (structural schema rule)
NOT_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable", "title",
                   "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                   "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
                   "x-kubernetes-validations"}
METADATA_FIELD_KEYS = {"type", "description", "pattern", "minLength", "maxLength", "enum", "format"}
PRINTER_TYPES = {"integer", "number", "string", "boolean", "date"}
PRINTER_FORMATS = {"", "int32", "int64", "float", "double", "byte", "date", "date-time", "password"}
RULE_REASONS = {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}

# Functions and macros of the CEL environment the API server gives x-kubernetes-validations:
# the CEL standard library plus the Kubernetes libraries (lists, regex, URLs, IP/CIDR, quantity,
# semver, format, strings extension, optionals). Operators (``_&&_``, ``@in``, ...) are separate.
CEL_FUNCTIONS = {
    # standard
    "size", "matches", "contains", "startsWith", "endsWith", "has", "all", "exists", "exists_one",
    "map", "filter", "int", "uint", "double", "string", "bytes", "bool", "type", "dyn", "duration",
    "timestamp", "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getFullYear",
    "getHours", "getMilliseconds", "getMinutes", "getMonth", "getSeconds",
    # strings extension
    "charAt", "indexOf", "lastIndexOf", "lowerAscii", "upperAscii", "replace", "split", "substring",
    "trim", "join", "format", "quote", "reverse",
    # kubernetes lists / regex / urls / ip / cidr / quantity / semver / format / sets
    "isSorted", "sum", "min", "max", "find", "findAll", "isURL", "url", "getScheme", "getHost",
    "getHostname", "getPort", "getEscapedPath", "getQuery", "isIP", "ip", "family", "isUnspecified",
    "isLoopback", "isLinkLocalMulticast", "isLinkLocalUnicast", "isGlobalUnicast", "isCanonical",
    "isCIDR", "cidr", "containsIP", "containsCIDR", "prefixLength", "masked", "isQuantity",
    "quantity", "sign", "isGreaterThan", "isLessThan", "compareTo", "asApproximateFloat",
    "asInteger", "isInteger", "add", "sub", "isSemver", "semver", "major", "minor", "patch",
    "named", "validate", "value", "hasValue", "orValue", "optMap", "optFlatMap", "of", "none",
    "sets.contains", "sets.equivalent", "sets.intersects", "transformList", "transformMap",
    "transformMapEntry", "existsOne",
}
_COMPREHENSION = re.compile(
    r"\.(?:all|exists|exists_one|existsOne|map|filter|transformList|transformMap|transformMapEntry)"
    r"\(\s*([A-Za-z_]\w*)\s*,(?:\s*([A-Za-z_]\w*)\s*,)?")
_SELF_CHAIN = re.compile(r"\b(self|oldSelf)((?:\s*\.\s*[A-Za-z_]\w*)+)(\s*\()?")


def is_protected_group(group: str) -> bool:
    """The API server's rule: k8s.io / kubernetes.io and their subdomains (x-k8s.io is not one)."""
    return group in ("k8s.io", "kubernetes.io") or group.endswith((".k8s.io", ".kubernetes.io"))


def approval_problems(crd: dict[str, Any]) -> list[str]:
    group = crd.get("spec", {}).get("group", "")
    if not is_protected_group(group):
        return []
    annotations = crd.get("metadata", {}).get("annotations") or {}
    where = f"metadata.annotations[{APPROVAL_ANNOTATION}]"
    value = annotations.get(APPROVAL_ANNOTATION)
    if value is None:
        return [f"{where}: Required value: protected groups must have approval annotation"]
    if not isinstance(value, str):
        return [f"{where}: must be a string"]
    if value.startswith("unapproved"):
        return []
    url = urlparse(value)
    if url.scheme not in ("http", "https") or not url.netloc:
        return [f"{where}: Invalid value {value!r}: not a URL of the approving PR and not 'unapproved...'"]
    return []


def crd_problems(crd: dict[str, Any], *, cel: bool = True) -> list[str]:
    """Everything a kube-apiserver would reject in this CRD (see the module docstring)."""
    problems = approval_problems(crd)
    spec = crd.get("spec", {})
    group, names = spec.get("group", ""), spec.get("names", {})
    if "." not in group:
        problems.append(f"spec.group: {group!r} should be a domain with at least one dot")
    if crd.get("metadata", {}).get("name") != f"{names.get('plural')}.{group}":
        problems.append('metadata.name: must be spec.names.plural+"."+spec.group')
    if names.get("kind") and names.get("kind") == names.get("listKind"):
        problems.append("spec.names.listKind: kind and listKind may not be the same")
    versions = spec.get("versions") or []
    if not versions:
        problems.append("spec.versions: Required value: must have at least one version")
    if sum(1 for v in versions if v.get("storage")) != 1:
        problems.append("spec.versions: must have exactly one version marked as storage version")
    if len({v.get("name") for v in versions}) != len(versions):
        problems.append("spec.versions: must contain unique version names")
    for i, version in enumerate(versions):
        where = f"spec.versions[{i}]"
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", str(version.get("name", ""))):
            problems.append(f"{where}.name: must be a DNS-1035 label")
        seen_cols: set[str] = set()
        for j, col in enumerate(version.get("additionalPrinterColumns") or []):
            cw = f"{where}.additionalPrinterColumns[{j}]"
            if not col.get("name") or col["name"] in seen_cols:
                problems.append(f"{cw}.name: required and unique")
            seen_cols.add(col.get("name", ""))
            if col.get("type") not in PRINTER_TYPES:
                problems.append(f"{cw}.type: Unsupported value {col.get('type')!r}")
            if col.get("format", "") not in PRINTER_FORMATS:
                problems.append(f"{cw}.format: Unsupported value {col.get('format')!r}")
            if not str(col.get("jsonPath", "")).startswith("."):
                problems.append(f"{cw}.jsonPath: must be a simple json path starting with .")
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            problems.append(f"{where}.schema.openAPIV3Schema: Required value")
            continue
        problems += schema_problems(schema, f"{where}.schema.openAPIV3Schema", cel=cel)
    return problems


def schema_problems(schema: dict[str, Any], path: str, *, cel: bool = True) -> list[str]:
    """Structural-schema, extension, default and CEL problems of one version's openAPIV3Schema."""
    problems: list[str] = []
    if schema.get("type") != "object":
        problems.append(f"{path}.type: Required value: must be object at the root")
    props = schema.get("properties") or {}
    for meta in ("apiVersion", "kind"):
        if meta in props and props[meta].get("type") != "string":
            problems.append(f"{path}.properties[{meta}].type: must be string")
    if "metadata" in props:
        problems += _metadata_problems(props["metadata"], f"{path}.properties[metadata]")
    _walk(schema, path, problems, cel=cel, correlatable=True, root=True)
    return problems


def _metadata_problems(meta: dict[str, Any], path: str) -> list[str]:
    problems = []
    if meta.get("type") != "object":
        problems.append(f"{path}.type: must be object")
    extra = set(meta) - {"type", "properties", "description"}
    if extra:
        problems.append(f"{path}: Forbidden: must not specify anything other than name and generateName, "
                        f"but got {sorted(extra)}")
    for field, sub in (meta.get("properties") or {}).items():
        if field not in ("name", "generateName"):
            problems.append(f"{path}.properties[{field}]: Forbidden: only name and generateName may be restricted")
        elif set(sub) - METADATA_FIELD_KEYS or sub.get("type", "string") != "string":
            problems.append(f"{path}.properties[{field}]: Forbidden: only string restrictions are allowed")
    return problems


def _walk(node: Any, path: str, problems: list[str], *, cel: bool, correlatable: bool, root: bool = False,
          in_junctor: bool = False) -> None:
    if not isinstance(node, dict):
        problems.append(f"{path}: must be a schema object")
        return
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    typ = node.get("type")
    for key in sorted(FORBIDDEN_KEYS & set(node)):
        problems.append(f"{path}.{key}: Forbidden: {key} is not supported")
    if in_junctor:
        for key in sorted(NOT_IN_JUNCTORS & set(node)):
            problems.append(f"{path}.{key}: Forbidden: must not be used inside {'/'.join(JUNCTORS)}")
    elif not typ and not int_or_string and not preserve:
        problems.append(f"{path}.type: Required value: must not be empty for specified fields")
    if typ is not None and typ not in TYPES:
        problems.append(f"{path}.type: Unsupported value {typ!r}")
    if int_or_string and typ:
        problems.append(f"{path}.type: must be empty with x-kubernetes-int-or-string")
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        problems.append(f"{path}.x-kubernetes-preserve-unknown-fields: must be true or undefined")
    if node.get("uniqueItems") is True:
        problems.append(f"{path}.uniqueItems: Forbidden: uniqueItems cannot be set to true")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}.additionalProperties: Forbidden: additionalProperties cannot be set to false")
    if "additionalProperties" in node and node.get("properties"):
        problems.append(f"{path}.additionalProperties: Forbidden: additionalProperties and properties "
                        "are mutual exclusive")
    if typ == "array" and "items" not in node and not in_junctor:
        problems.append(f"{path}.items: Required value: must be specified for arrays")
    if isinstance(node.get("items"), list):
        problems.append(f"{path}.items: Forbidden: items must be a schema object, not an array")
    if node.get("nullable") and "default" in node and node["default"] is None:
        pass  # a null default on a nullable field is allowed
    elif "default" in node and not in_junctor:
        if root:
            problems.append(f"{path}.default: Forbidden: must not be set at the root")
        else:
            problems += _default_problems(node, path)
    problems += _list_problems(node, path)
    if "x-kubernetes-map-type" in node:
        if typ != "object":
            problems.append(f"{path}.x-kubernetes-map-type: must only be used with type object")
        if node["x-kubernetes-map-type"] not in ("granular", "atomic"):
            problems.append(f"{path}.x-kubernetes-map-type: Unsupported value {node['x-kubernetes-map-type']!r}")
    if node.get("x-kubernetes-embedded-resource") and typ != "object":
        problems.append(f"{path}.type: must be object if x-kubernetes-embedded-resource is true")
    if node.get("x-kubernetes-validations"):
        problems += cel_rule_problems(node, path, correlatable=correlatable, check=cel)

    for name, sub in (node.get("properties") or {}).items():
        _walk(sub, f"{path}.properties[{name}]", problems, cel=cel, correlatable=correlatable,
              in_junctor=in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}.additionalProperties", problems, cel=cel,
              correlatable=correlatable, in_junctor=in_junctor)
    if isinstance(node.get("items"), dict):
        is_map_list = node.get("x-kubernetes-list-type") == "map"
        _walk(node["items"], f"{path}.items", problems, cel=cel, correlatable=correlatable and is_map_list,
              in_junctor=in_junctor)
    for junctor in JUNCTORS:
        subs = node.get(junctor)
        if subs is None:
            continue
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            if int_or_string and junctor in ("anyOf", "allOf"):
                continue  # the two int-or-string patterns set type inside anyOf on purpose
            _walk(sub, f"{path}.{junctor}[{i}]", problems, cel=cel, correlatable=False, in_junctor=True)


def _list_problems(node: dict[str, Any], path: str) -> list[str]:
    problems: list[str] = []
    list_type = node.get("x-kubernetes-list-type")
    keys = node.get("x-kubernetes-list-map-keys")
    if list_type is None and keys is None:
        return problems
    if node.get("type") != "array":
        problems.append(f"{path}.x-kubernetes-list-type: must only be used with type array")
        return problems
    items = node.get("items") if isinstance(node.get("items"), dict) else {}
    if list_type not in ("atomic", "set", "map"):
        problems.append(f"{path}.x-kubernetes-list-type: Unsupported value {list_type!r}")
    if keys is not None and list_type != "map":
        problems.append(f"{path}.x-kubernetes-list-map-keys: must only be used with x-kubernetes-list-type map")
    if list_type == "set" and items.get("type") not in SCALAR_TYPES and items.get("x-kubernetes-map-type") != "atomic":
        problems.append(f"{path}.items: set lists must hold scalars (or atomic maps)")
    if list_type == "map":
        if items.get("type") != "object":
            problems.append(f"{path}.items.type: map lists must hold objects")
        if not keys:
            problems.append(f"{path}.x-kubernetes-list-map-keys: Required value: "
                            "must not be empty if x-kubernetes-list-type is map")
        required = set(items.get("required") or [])
        item_props = items.get("properties") or {}
        for key in keys or []:
            prop = item_props.get(key)
            if prop is None:
                problems.append(f"{path}.x-kubernetes-list-map-keys: {key!r}: entries must all be names "
                                "of item properties")
            elif prop.get("type") not in SCALAR_TYPES:
                problems.append(f"{path}.x-kubernetes-list-map-keys: {key!r}: must be a scalar field")
            elif key not in required and "default" not in prop:
                problems.append(f"{path}.x-kubernetes-list-map-keys: {key!r}: must be required or have a default")
            elif prop.get("nullable"):
                problems.append(f"{path}.x-kubernetes-list-map-keys: {key!r}: must not be nullable")
    return problems


def strict_json_schema(schema: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema that rejects unknown fields.

    Unknown fields are what the API server silently prunes; in a manifest or a default that is a
    misspelt field, so it fails here.
    """
    if isinstance(schema, list):
        return [strict_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_json_schema(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "default")}
    if "properties" in schema:
        out["properties"] = {k: strict_json_schema(v) for k, v in schema["properties"].items()}
    if (schema.get("type") == "object" and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("type") == "object" and not schema.get("properties") and "additionalProperties" not in schema:
        out.pop("additionalProperties", None)  # e.g. metadata: free-form here
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _default_problems(node: dict[str, Any], path: str) -> list[str]:
    import jsonschema

    try:
        jsonschema.validate(node["default"], strict_json_schema(node))
    except jsonschema.ValidationError as exc:
        return [f"{path}.default: Invalid value {node['default']!r}: {exc.message}"]
    return []


def _free_variables(expr: str, variables: list[str]) -> set[str]:
    bound = {v for m in _COMPREHENSION.finditer(expr) for v in m.groups() if v}
    return set(variables) - bound


def _field_problems(expr: str, node: dict[str, Any], where: str) -> list[str]:
    """``self.a.b`` must name fields the schema has (the server's type-check: 'undefined field')."""
    problems = []
    for m in _SELF_CHAIN.finditer(expr):
        fields = [f.strip() for f in m.group(2).split(".") if f.strip()]
        if m.group(3):  # the last name is a method call: self.size(), self.a.startsWith(...)
            fields = fields[:-1]
        cur = node
        for field in fields:
            if cur.get("x-kubernetes-preserve-unknown-fields") or cur.get("type") != "object":
                break
            props = cur.get("properties")
            if props is None:  # a map (additionalProperties): any key is fine
                break
            if field not in props:
                problems.append(f"{where}: undefined field {field!r} in {m.group(0).strip()!r}")
                break
            cur = props[field]
    return problems


def cel_rule_problems(node: dict[str, Any], path: str, *, correlatable: bool, check: bool = True) -> list[str]:
    """Each x-kubernetes-validations entry compiles and only refers to what the server declares."""
    problems: list[str] = []
    rules = node["x-kubernetes-validations"]
    if not isinstance(rules, list):
        return [f"{path}.x-kubernetes-validations: must be a list"]
    for i, rule in enumerate(rules):
        where = f"{path}.x-kubernetes-validations[{i}]"
        expr = rule.get("rule")
        if not expr:
            problems.append(f"{where}.rule: Required value")
            continue
        if rule.get("reason") is not None and rule["reason"] not in RULE_REASONS:
            problems.append(f"{where}.reason: Unsupported value {rule['reason']!r}")
        if rule.get("fieldPath") is not None and not str(rule["fieldPath"]).startswith("."):
            problems.append(f"{where}.fieldPath: must be a valid path relative to the schema node")
        if not check:
            continue
        exprs = [("rule", expr)] + ([("messageExpression", rule["messageExpression"])]
                                    if rule.get("messageExpression") else [])
        for key, text in exprs:
            problems += _compile_problems(text, f"{where}.{key}", node, correlatable=correlatable,
                                          allow_old=key == "rule")
    return problems


def _compile_problems(expr: str, where: str, node: dict[str, Any], *, correlatable: bool,
                      allow_old: bool) -> list[str]:
    import cel

    try:
        program = cel.compile(expr)
    except (ValueError, RuntimeError) as exc:
        return [f"{where}: compilation failed: {str(exc).splitlines()[0]}"]
    problems = []
    free = _free_variables(expr, program.variables())
    allowed = {"self", "oldSelf"} if allow_old else {"self"}
    if free - allowed:
        problems.append(f"{where}: undeclared reference to {sorted(free - allowed)} in {expr!r}")
    if "oldSelf" in free and not correlatable:
        problems.append(f"{where}: oldSelf cannot be used on the uncorrelatable portion of the schema "
                        "(inside the items of a list that is not x-kubernetes-list-type map)")
    unknown = {f for f in program.functions() if f[:1] not in ("_", "@", "!", "-")} - CEL_FUNCTIONS
    if unknown:
        problems.append(f"{where}: undeclared function(s) {sorted(unknown)} in {expr!r}")
    return problems + _field_problems(expr, node, where)


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """The object as the API server stores it: schema defaults filled in (for evaluating rules)."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        out = dict(obj)
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name not in out and "default" in sub:
                out[name] = sub["default"]
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            out = {k: apply_defaults(v, schema["additionalProperties"]) if k not in props else v
                   for k, v in out.items()}
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(v, schema["items"]) for v in obj]
    return obj


def failing_rules(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule (but transition rules) on ``obj``, as the server
    does on create (after defaulting); returns the messages of the rules that do not hold."""
    import cel

    failed = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in rule["rule"]:
            continue  # transition rules do not run on create
        try:
            ok = cel.evaluate(rule["rule"], {"self": obj})
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            failed.append(f"{path or '<root>'}: {rule['rule']!r} errored: {exc}")
            continue
        if ok is not True:
            failed.append(f"{path or '<root>'}: {rule.get('message') or rule['rule']}")
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for key, value in obj.items():
            sub = props.get(key) or (schema.get("additionalProperties") if isinstance(
                schema.get("additionalProperties"), dict) else None)
            if sub is not None:
                failed += failing_rules(value, sub, f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            failed += failing_rules(value, schema["items"], f"{path}[{i}]")
    return failed
