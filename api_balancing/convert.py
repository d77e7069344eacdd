"""Domain records -> foghorn.v1 messages (the other direction is ``validation``)."""

from __future__ import annotations

from api_balancing.index import Ranked
from api_balancing.model import GeoPoint, LoadReport, NodeIdentity, NodeRecord
from api_balancing.scoring import Evaluation
from api_balancing.urls import playback_urls
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb


def geo(point: GeoPoint) -> pb.GeoPoint:
    return pb.GeoPoint(latitude=point.latitude, longitude=point.longitude)


def identity(ident: NodeIdentity) -> pb.Register:
    msg = pb.Register(
        node_id=ident.node_id,
        roles=sorted(ident.roles),
        capabilities=sorted(ident.capabilities),
        base_url=ident.base_url,
        capacity=ident.capacity,
        region=ident.region,
    )
    if ident.location is not None:
        msg.location.CopyFrom(geo(ident.location))
    return msg


def report(rep: LoadReport) -> pb.LoadReport:
    return pb.LoadReport(
        cpu_percent=rep.cpu_percent,
        ram_used_bytes=rep.ram_used_bytes,
        ram_max_bytes=rep.ram_max_bytes,
        upload_bps=rep.upload_bps,
        download_bps=rep.download_bps,
        bandwidth_limit_bps=rep.bandwidth_limit_bps,
        streams=[
            pb.StreamLoad(
                stream_id=s.stream_id,
                tenant_id=s.tenant_id,
                viewers=s.viewers,
                inputs=s.inputs,
                upload_bps=s.upload_bps,
            )
            for s in rep.streams
        ],
    )


def node_info(rec: NodeRecord, *, now: float, stale: bool, pending: int) -> pb.NodeInfo:
    health = pb.NodeHealth(
        connected=rec.connected,
        stale=stale,
        last_report_age_s=(now - rec.last_report_at) if rec.report is not None else -1.0,
        reports_accepted=rec.reports_accepted,
        reports_rejected=rec.reports_rejected,
        last_rejection=rec.last_rejection,
        owner_replica=rec.owner,
        connected_since=rec.connected_at if rec.connected else 0.0,
        disconnected_at=0.0 if rec.connected else rec.disconnected_at,
        pending_redirects=pending,
    )
    info = pb.NodeInfo(
        identity=identity(rec.identity),
        mode=pb.NodeMode.ValueType(rec.mode),
        last_report_at=rec.last_report_at,
        health=health,
        version=rec.version,
        mode_reason=rec.mode_reason,
    )
    if rec.report is not None:
        info.last_report.CopyFrom(report(rec.report))
    return info


def candidate(
    ranked: Ranked, rec: NodeRecord | None, content_id: str, protocol: str
) -> pb.RouteCandidate:
    if rec is None:  # deleted between ranking and reply: still name it
        return pb.RouteCandidate(
            node_id=ranked.node_id, score=ranked.score, distance_km=ranked.distance_km
        )
    ident = rec.identity
    urls = (
        [
            pb.PlaybackUrl(protocol=p, url=u)
            for p, u in playback_urls(ident.base_url, content_id, ident.capabilities, protocol)
        ]
        if content_id
        else []
    )
    return pb.RouteCandidate(
        node_id=ranked.node_id,
        base_url=ident.base_url,
        urls=urls,
        score=ranked.score,
        distance_km=ranked.distance_km,
        region=ident.region,
    )


def explanation(e: Evaluation, rank: int) -> pb.NodeExplanation:
    p = e.parts
    return pb.NodeExplanation(
        node_id=e.node_id,
        eligible=e.eligible,
        rejection=pb.Rejection.ValueType(e.rejection),
        reason=e.reason,
        score=e.score,
        parts=pb.ScoreParts(
            cpu=p.cpu,
            ram=p.ram,
            bandwidth=p.bandwidth,
            geo=p.geo,
            stream_bonus=p.stream_bonus,
            redirect_penalty_bps=p.redirect_penalty_bps,
        ),
        distance_km=e.distance_km,
        rank=rank,
    )
