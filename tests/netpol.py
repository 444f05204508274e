"""A small evaluator of Kubernetes NetworkPolicy ingress, for proving what the chart allows.

Semantics (networking.k8s.io/v1): a pod selected by no policy with policyType Ingress accepts
everything; a pod selected by at least one accepts a connection when some ingress rule of one
of those policies matches the source and the port. A rule's `from` peer is a podSelector (pods
in the policy's namespace), a namespaceSelector (pods in matching namespaces), or both (pods
matching both); no `from` means any source, no `ports` any port. Namespaces are matched by
their `kubernetes.io/metadata.name` label. ipBlock peers never match a pod here (the chart uses
them only for egress to addresses outside the cluster)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict = field(default_factory=dict)


def _matches(selector: dict | None, labels: dict) -> bool:
    """matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist); {} matches all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        return False
    ns_ok = _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace}) \
        if "namespaceSelector" in peer else source.namespace == policy_ns
    return ns_ok and ("podSelector" not in peer or _matches(peer["podSelector"], source.labels))


def _port_matches(ports: list | None, port: int) -> bool:
    return not ports or any(p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports)


def allowed(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Whether `source` may open a TCP connection to `target` on `port`."""
    selecting = [p for p in policies if p["metadata"].get("namespace", target.namespace) == target.namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and _matches(p["spec"]["podSelector"], target.labels)]
    if not selecting:
        return True
    for p in selecting:
        ns = p["metadata"].get("namespace", target.namespace)
        for rule in p["spec"].get("ingress") or []:
            peers = rule.get("from")
            if (not peers or any(_peer_matches(peer, ns, source) for peer in peers)) and _port_matches(rule.get("ports"), port):
                return True
    return False
