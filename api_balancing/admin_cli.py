"""``foghorn-admin``: operator commands against Foghorn, printed as tables.

    foghorn-admin --foghorn 127.0.0.1:18008 --token secret nodes
    foghorn-admin ... node edge-paris-003
    foghorn-admin ... set-mode edge-paris-003 draining --reason "kernel upgrade"
    foghorn-admin ... explain live-0001 --lat 48.85 --lon 2.35
    foghorn-admin ... route live-0001 --lat 48.85 --lon 2.35
    foghorn-admin ... ingest my-stream-key --lat 48.85 --lon 2.35 --protocol srt
    foghorn-admin ... command edge-paris-003 drain 100

Defaults: ``--foghorn`` from $FOGHORN_ADDR, ``--token`` from $FOGHORN_TOKEN. Talks through
``pkg.clients`` (retries, breaker, failover across comma-separated replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

import grpc

from pkg.clients.foghorn import FoghornClient, parse_targets
from pkg.common.tls import add_tls_arguments, credentials_from_args
from pkg.proto.foghorn.v1 import foghorn_pb2 as pb


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mode(value: pb.NodeMode.ValueType) -> str:
    return pb.NodeMode.Name(value).removeprefix("NODE_MODE_").lower()


def _gbps(bps: int) -> str:
    return f"{bps / 1e9:.2f}"


def _nodes_table(nodes: Sequence[pb.NodeInfo]) -> str:
    rows = []
    for n in nodes:
        r, h = n.last_report, n.health
        has = n.HasField("last_report")
        rows.append(
            [
                n.identity.node_id,
                _mode(n.mode),
                "yes" if h.connected else "no",
                "yes" if h.stale else "no",
                n.identity.region or "-",
                f"{r.cpu_percent:.1f}" if has else "-",
                f"{100 * r.ram_used_bytes / r.ram_max_bytes:.1f}"
                if has and r.ram_max_bytes
                else "-",
                f"{_gbps(r.upload_bps)}/{_gbps(r.bandwidth_limit_bps)}" if has else "-",
                len(r.streams) if has else 0,
                sum(s.viewers for s in r.streams) if has else 0,
                f"{h.last_report_age_s:.1f}" if h.last_report_age_s >= 0 else "-",
                h.reports_rejected,
            ]
        )
    headers = ["NODE", "MODE", "CONN", "STALE", "REGION", "CPU%", "RAM%", "UP/LIMIT Gbps",
               "STREAMS", "VIEWERS", "AGE s", "REJECTED"]  # fmt: skip
    return table(headers, rows) + f"\n{len(nodes)} node(s)"


def _node_detail(n: pb.NodeInfo) -> str:
    i, h, r = n.identity, n.health, n.last_report
    lines = [
        f"node          {i.node_id}",
        f"mode          {_mode(n.mode)}" + (f" ({n.mode_reason})" if n.mode_reason else ""),
        f"roles         {', '.join(i.roles)}",
        f"capabilities  {', '.join(i.capabilities)}",
        f"base url      {i.base_url}",
        f"region        {i.region or '-'}",
        "location      "
        + (f"{i.location.latitude}, {i.location.longitude}" if i.HasField("location") else "-"),
        f"capacity      {i.capacity} viewers",
        f"connected     {'yes' if h.connected else 'no'} (owner {h.owner_replica or '-'})",
        f"stale         {'yes' if h.stale else 'no'}"
        + (f" (last report {h.last_report_age_s:.1f} s ago)" if h.last_report_age_s >= 0 else ""),
        f"reports       {h.reports_accepted} accepted, {h.reports_rejected} rejected"
        + (f" (last: {h.last_rejection})" if h.last_rejection else ""),
        f"pending       {h.pending_redirects} redirect(s) not shown up yet",
        f"version       {n.version}",
    ]
    if n.HasField("last_report"):
        lines += [
            f"cpu           {r.cpu_percent:.1f} %",
            f"ram           {r.ram_used_bytes / 2**30:.1f} / {r.ram_max_bytes / 2**30:.1f} GiB",
            f"upload        {_gbps(r.upload_bps)} / {_gbps(r.bandwidth_limit_bps)} Gbps",
            "",
            table(
                ["STREAM", "TENANT", "VIEWERS", "INPUTS"],
                [[s.stream_id, s.tenant_id, s.viewers, s.inputs] for s in r.streams],
            ),
        ]
    return "\n".join(lines)


def _candidates(best: pb.RouteCandidate, fallbacks: Sequence[pb.RouteCandidate]) -> str:
    rows = []
    for rank, c in enumerate([best, *fallbacks], start=1):
        url = c.urls[0].url if c.urls else c.base_url
        dist = f"{c.distance_km:.0f}" if c.distance_km >= 0 else "-"
        rows.append([rank, c.node_id, f"{c.score:.1f}", dist, c.region or "-", url])
    return table(["RANK", "NODE", "SCORE", "KM", "REGION", "URL"], rows)


async def _run(args: argparse.Namespace) -> int:
    credentials = credentials_from_args(args)
    async with FoghornClient(
        args.foghorn, token=args.token or None, credentials=credentials
    ) as client:
        cmd = args.cmd
        if cmd == "nodes":
            nodes = await client.list_nodes(mode=args.mode, connected_only=args.connected)
            print(_nodes_table(nodes))
        elif cmd == "node":
            print(_node_detail(await client.get_node(args.node_id)))
        elif cmd == "set-mode":
            mode_reply = await client.set_mode(
                args.node_id, args.mode, reason=args.reason, ack_timeout_s=args.ack_timeout
            )
            c = mode_reply.command
            ack = (
                f"acked: {c.message}"
                if c.acked
                else ("not connected" if not c.delivered else f"no ack: {c.message}")
            )
            print(f"{args.node_id}: mode {_mode(mode_reply.node.mode)} ({ack})")
        elif cmd == "explain":
            explained = await client.explain_route(
                args.content_id, lat=args.lat, lon=args.lon, ip=args.ip, protocol=args.protocol
            )
            rows = []
            for e in explained.nodes:
                p = e.parts
                rows.append(
                    [
                        e.rank or "-",
                        e.node_id,
                        f"{e.score:.1f}" if e.eligible else "-",
                        *(
                            (
                                f"{p.cpu:.0f}",
                                f"{p.ram:.0f}",
                                f"{p.bandwidth:.0f}",
                                f"{p.geo:.0f}",
                                f"{p.stream_bonus:.0f}",
                                f"{p.redirect_penalty_bps / 1e6:.1f}",
                            )
                            if e.eligible
                            else ("-",) * 6
                        ),
                        f"{e.distance_km:.0f}" if e.distance_km >= 0 else "-",
                        e.reason or "eligible",
                    ]
                )
            print(f"weights: {explained.weights}")
            if explained.HasField("viewer_location"):
                loc = explained.viewer_location
                print(f"viewer:  {loc.latitude}, {loc.longitude}")
            else:
                print("viewer:  location unknown (geo ignored)")
            headers = ["RANK", "NODE", "SCORE", "CPU", "RAM", "BW", "GEO", "BONUS",
                       "PENDING Mbps", "KM", "REASON"]  # fmt: skip
            print(table(headers, rows))
        elif cmd == "route":
            routed = await client.route_viewer(
                args.content_id,
                lat=args.lat,
                lon=args.lon,
                ip=args.ip,
                protocol=args.protocol,
                max_fallbacks=args.fallbacks,
            )
            print(_candidates(routed.best, routed.fallbacks))
            print(f"considered {routed.considered} node(s)")
            for u in routed.best.urls:
                print(f"{u.protocol:7} {u.url}")
        elif cmd == "ingest":
            ingest = await client.route_ingest(
                args.stream_key, lat=args.lat, lon=args.lon, ip=args.ip, protocol=args.protocol
            )
            print(_candidates(ingest.best, ingest.fallbacks))
            print(f"push to {ingest.ingest_url}")
        elif cmd == "command":
            command = pb.Command()
            if args.action == "stop-sessions":
                command.stop_sessions.stream_id = args.arg
            else:
                try:
                    command.drain.target_viewers = int(args.arg)
                except ValueError:
                    print("foghorn-admin: drain needs a viewer count", file=sys.stderr)
                    return 2
            started = time.monotonic()
            result = await client.send_command(args.node_id, command, timeout_s=args.timeout)
            took = (time.monotonic() - started) * 1000
            state = "ok" if result.ok else "refused"
            print(f"{args.node_id}: {state}: {result.message} ({result.request_id}, {took:.0f} ms)")
        elif cmd == "move-nodes":
            request = pb.MoveNodesRequest(targets=parse_targets(args.to), max_nodes=args.max)
            moved: pb.MoveNodesResponse = await client.admin.MoveNodes(request, timeout=10.0)
            print(f"{moved.told} node(s) told to reconnect to {args.to}; {moved.staying} staying")
    return 0


def _location_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lat", type=float)
    p.add_argument("--lon", type=float)
    p.add_argument("--ip", default="", help="viewer IP (located through the GeoIP table)")
    p.add_argument("--protocol", default="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foghorn-admin", description="Operate a Foghorn fleet")
    parser.add_argument("--foghorn", default=os.environ.get("FOGHORN_ADDR", "127.0.0.1:18008"))
    parser.add_argument("--token", default=os.environ.get("FOGHORN_TOKEN", ""))
    add_tls_arguments(parser)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("nodes", help="list nodes")
    p.add_argument("--mode", choices=["normal", "draining", "maintenance"])
    p.add_argument("--connected", action="store_true", help="only connected nodes")
    p = sub.add_parser("node", help="one node with its last report and health")
    p.add_argument("node_id")
    p = sub.add_parser("set-mode", help="set a node's operational mode")
    p.add_argument("node_id")
    p.add_argument("mode", choices=["normal", "draining", "maintenance"])
    p.add_argument("--reason", default="")
    p.add_argument("--ack-timeout", type=float, default=2.0)
    p = sub.add_parser("explain", help="score parts and rejection reasons for every node")
    p.add_argument("content_id")
    _location_args(p)
    p = sub.add_parser("route", help="resolve a viewer endpoint")
    p.add_argument("content_id")
    _location_args(p)
    p.add_argument("--fallbacks", type=int, default=3)
    p = sub.add_parser("ingest", help="resolve an ingest endpoint for a stream key")
    p.add_argument("stream_key")
    _location_args(p)
    p = sub.add_parser("command", help="send a command and wait for the node's ack")
    p.add_argument("node_id")
    p.add_argument("action", choices=["stop-sessions", "drain"])
    p.add_argument("arg", help="stream id (stop-sessions) or target viewers (drain)")
    p.add_argument("--timeout", type=float, default=5.0)
    p = sub.add_parser(
        "move-nodes",
        help="move the node streams of the one replica given with --foghorn to other replicas "
        "(rollout / rollback: the nodes reconnect at once and stay routable)",
    )
    p.add_argument("--to", required=True, help="host:port[,host:port] to move the nodes to")
    p.add_argument("--max", type=int, default=0, help="at most this many nodes (0: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call):
            print(f"foghorn-admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
        else:
            print(f"foghorn-admin: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"foghorn-admin: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
