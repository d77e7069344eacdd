"""What a method's own contract says about retrying it: protobuf's ``idempotency_level``.

``google.protobuf.MethodOptions.idempotency_level`` is the standard place where a ``.proto``
says that a method has no side effects (``NO_SIDE_EFFECTS``) or that sending it twice has the
same effect as sending it once (``IDEMPOTENT``)::

    rpc GetNode(GetNodeRequest) returns (NodeInfo) {
      option idempotency_level = NO_SIDE_EFFECTS;
    }

The generated ``_pb2`` module of a service registers its descriptor in protobuf's default
pool when it is imported, which a stub's module does; so by the time a stub calls a method its
contract can be read here. A method that is not in the pool, or says nothing, is not safe to
retry once it may have reached the server: the name of a method (``GetOrCreateCart``,
``ListenAndCharge``) proves nothing.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool

NO_SIDE_EFFECTS: int = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
IDEMPOTENT: int = descriptor_pb2.MethodOptions.IDEMPOTENT
IDEMPOTENCY_UNKNOWN: int = descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN


# gRPC's own standard services read only, but their .proto files predate the option.
WELL_KNOWN_READ_ONLY_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)


def split_method(method: str) -> tuple[str, str] | None:
    """``"/pkg.v1.Service/Method"`` -> ``("pkg.v1.Service", "Method")``; None if not that shape."""
    if not method.startswith("/"):
        return None
    service, sep, name = method[1:].partition("/")
    if not sep or not service or not name or "/" in name:
        return None
    return service, name


def idempotency_level(
    method: str, pool: descriptor_pool.DescriptorPool | None = None
) -> int | None:
    """The ``idempotency_level`` declared for ``method`` ("/pkg.Service/Method").

    None when the method is unknown to ``pool`` (default: protobuf's default pool, where
    imported ``_pb2`` modules register their services).
    """
    parts = split_method(method)
    if parts is None:
        return None
    service_name, method_name = parts
    try:
        service = (pool or descriptor_pool.Default()).FindServiceByName(service_name)
    except KeyError:
        return None
    found = service.methods_by_name.get(method_name)
    if found is None:
        return None
    level: int = found.GetOptions().idempotency_level
    return level


def declared_safe(method: str, pool: descriptor_pool.DescriptorPool | None = None) -> bool:
    """Whether the contract of ``method`` marks it ``NO_SIDE_EFFECTS`` or ``IDEMPOTENT`` (or it
    belongs to one of gRPC's read-only standard services: health, reflection)."""
    parts = split_method(method)
    if parts is not None and parts[0] in WELL_KNOWN_READ_ONLY_SERVICES:
        return True
    return idempotency_level(method, pool) in (NO_SIDE_EFFECTS, IDEMPOTENT)
