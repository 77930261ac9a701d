"""Validators for infra/ (used by tests/test_infra.py; each returns a list of problems, [] = valid).

* Ray cluster launcher files: Ray's own ``prepare_config`` + ``validate_config`` (the schema bundled
  with ray.autoscaler), then each node type's ``node_config`` against the cloud API it is sent to:
  EC2 ``RunInstances`` (botocore's service model) and Compute Engine ``instances.insert`` (the
  ``Instance`` schema of the discovery document that google-api-python-client ships).
* Kubernetes manifests: core kinds with kubernetes-validate (strict: unknown fields are errors).
  KubeRay's RayCluster / RayJob have no validator on the package registry: their fields are checked
  against the ``ray.io/v1`` field list of the KubeRay API reference (KubeRay v1.6,
  https://docs.ray.io/en/latest/cluster/kubernetes/references/api.html), written down here as a JSON
  schema that refuses unknown or misplaced fields, and every pod template inside them is validated
  as a Kubernetes ``v1 PodTemplate`` with kubernetes-validate, metadata as ``ObjectMeta``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

K8S_VERSIONS = ("1.30", "1.37")  # the oldest Kubernetes the managed services still run, and the newest schema

# -- Ray cluster launcher ------------------------------------------------------------------------


def launcher_problems(config: dict) -> list[str]:
    """Ray's validation (defaults of the provider merged in first, as ``ray up`` does) and the
    node configs against the cloud's API."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as error:  # jsonschema.ValidationError, ValueError, RuntimeError
        return [f"ray validate_config: {type(error).__name__}: {str(error).splitlines()[0]}"]
    problems = []
    provider = config["provider"]["type"]
    for name, node_type in prepared["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        if provider == "aws":
            problems += [f"{name}.node_config{p}" for p in ec2_problems(node_config)]
        elif provider == "gcp":
            problems += [f"{name}.node_config{p}" for p in gce_problems(node_config)]
    return problems


def ec2_problems(node_config: dict) -> list[str]:
    """``node_config`` against botocore's EC2 ``RunInstances`` input (names, nesting, types, enums)."""
    import botocore.session

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    return _botocore(node_config, shape, "")


def _botocore(value: Any, shape, path: str) -> list[str]:
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        problems = []
        for key, item in value.items():
            if key not in shape.members:
                problems.append(f"{path}.{key}: not a field of {shape.name} (fields: {', '.join(shape.members)})")
            else:
                problems += _botocore(item, shape.members[key], f"{path}.{key}")
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, item in enumerate(value) for p in _botocore(item, shape.member, f"{path}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        return [p for k, item in value.items() for p in _botocore(item, shape.value, f"{path}.{k}")]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: expected a string"]
        if shape.enum and value not in shape.enum:
            return [f"{path}: {value!r} is not one of EC2's {shape.name} values"]
        return []
    if kind in ("integer", "long"):
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{path}: expected an integer"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: expected true/false"]
    return []


def gce_problems(node_config: dict) -> list[str]:
    """``node_config`` against the Compute Engine v1 ``Instance`` resource (what ``instances.insert``
    receives; Ray adds name, labels and network defaults)."""
    import importlib.resources

    document = json.loads(
        (importlib.resources.files("googleapiclient") / "discovery_cache" / "documents" / "compute.v1.json").read_text()
    )
    return _discovery(node_config, {"$ref": "Instance"}, document["schemas"], "")


def _discovery(value: Any, schema: dict, schemas: dict, path: str) -> list[str]:
    if "$ref" in schema:
        return _discovery(value, schemas[schema["$ref"]], schemas, path)
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        problems = []
        for key, item in value.items():
            if key in properties:
                problems += _discovery(item, properties[key], schemas, f"{path}.{key}")
            elif extra is not None:
                problems += _discovery(item, extra, schemas, f"{path}.{key}")
            else:
                problems.append(f"{path}.{key}: not a field of {schema.get('id', 'this object')} (fields: {', '.join(sorted(properties))})")
        return problems
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, item in enumerate(value) for p in _discovery(item, schema["items"], schemas, f"{path}[{i}]")]
    if kind == "string":
        if schema.get("format") in ("int64", "uint64") and isinstance(value, int) and not isinstance(value, bool):
            return []  # JSON numbers are accepted for int64 fields
        if not isinstance(value, str):
            return [f"{path}: expected a string"]
        if "enum" in schema and value not in schema["enum"]:
            return [f"{path}: {value!r} is not one of {schema['enum']}"]
        return []
    if kind == "integer":
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{path}: expected an integer"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: expected true/false"]
    return []


# -- Kubernetes --------------------------------------------------------------------------------


def k8s_problems(document: dict, versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """A core Kubernetes object against its schema (kubernetes-validate, strict)."""
    import kubernetes_validate

    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            problems.append(f"{document.get('kind')} {where} (Kubernetes {version}): {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(error.message)
    return problems


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ANY_OBJECT = {"type": "object"}  # checked elsewhere (pod templates, metadata) or not used by refseg
# rayStartParams: `ray start` options without the dashes, every value a string.
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_HEAD_GROUP = _object({
    "rayStartParams": _RAY_START_PARAMS, "template": _ANY_OBJECT, "serviceType": _STR, "enableIngress": _BOOL,
    "headService": _ANY_OBJECT, "labels": _STR_MAP, "resources": _STR_MAP,
}, required=("template",))
_WORKER_GROUP = _object({
    "groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT, "numOfHosts": _INT,
    "idleTimeoutSeconds": _INT, "rayStartParams": _RAY_START_PARAMS, "template": _ANY_OBJECT,
    "scaleStrategy": _object({"workersToDelete": {"type": "array", "items": _STR}}), "suspend": _BOOL,
    "labels": _STR_MAP, "resources": _STR_MAP,
}, required=("groupName", "minReplicas", "maxReplicas", "template"))
_CLUSTER_SPEC = _object({
    "rayVersion": _STR,
    "enableInTreeAutoscaling": _BOOL,
    "autoscalerOptions": _object({
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "idleTimeoutSeconds": _INT,
        "version": {"enum": ["v1", "v2"]}, "image": _STR, "imagePullPolicy": _STR, "resources": _ANY_OBJECT,
        "env": {"type": "array"}, "envFrom": {"type": "array"}, "securityContext": _ANY_OBJECT, "volumeMounts": {"type": "array"},
    }),
    "authOptions": _object({"mode": {"enum": ["disabled", "token"]}, "secretName": _STR, "enableK8sTokenAuth": _BOOL}),
    "headGroupSpec": _HEAD_GROUP,
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "headServiceAnnotations": _STR_MAP, "suspend": _BOOL, "managedBy": _STR,
    "gcsFaultToleranceOptions": _ANY_OBJECT, "upgradeStrategy": _object({"type": {"enum": ["Recreate", "None"]}}),
}, required=("headGroupSpec",))
_RAYJOB_SPEC = _object({
    "entrypoint": _STR, "runtimeEnvYAML": _STR, "shutdownAfterJobFinishes": _BOOL, "ttlSecondsAfterFinished": _INT,
    "activeDeadlineSeconds": _INT, "preRunningDeadlineSeconds": _INT, "backoffLimit": _INT,
    "rayClusterSpec": _CLUSTER_SPEC, "clusterSelector": _STR_MAP,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "submitterPodTemplate": _ANY_OBJECT, "submitterConfig": _object({"backoffLimit": _INT}),
    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"}, "entrypointResources": _STR,
    "jobId": _STR, "suspend": _BOOL, "deletionStrategy": _ANY_OBJECT, "managedBy": _STR, "metadata": _STR_MAP,
})
KUBERAY_SCHEMAS = {
    kind: _object({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _ANY_OBJECT, "spec": spec},
                  required=("apiVersion", "kind", "metadata", "spec"))
    for kind, spec in (("RayCluster", _CLUSTER_SPEC), ("RayJob", _RAYJOB_SPEC))
}


def pod_templates(document: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod template in a RayCluster / RayJob."""
    spec = document["spec"]
    out = []
    cluster = spec.get("rayClusterSpec", spec) if document["kind"] == "RayJob" else spec
    prefix = "spec.rayClusterSpec" if document["kind"] == "RayJob" else "spec"
    if "headGroupSpec" in cluster:
        out.append((f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        out.append((f"{prefix}.workerGroupSpecs[{i}].template", group["template"]))
    if document["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        out.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def kuberay_problems(document: dict) -> list[str]:
    """A RayCluster / RayJob: its own fields (KubeRay's API), its metadata and pod templates (Kubernetes')."""
    import jsonschema

    kind = document.get("kind")
    if kind not in KUBERAY_SCHEMAS:
        return [f"not a KubeRay kind this check knows: {kind}"]
    validator = jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[kind])
    problems = [f"{kind} {'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    if problems:
        return problems
    problems += k8s_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]})
    for where, template in pod_templates(document):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        problems += [f"{kind} {where}: {p}" for p in k8s_problems(wrapped)]
    return problems


def manifest_problems(document: dict) -> list[str]:
    if document.get("apiVersion") == "ray.io/v1":
        return kuberay_problems(document)
    return k8s_problems(document)
