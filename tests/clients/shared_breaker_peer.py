"""A second process sharing a breaker through Redis (run by test_shared_breaker.py).

It drives the shared breaker open with failing calls, then reports every state its local
breaker takes until it sees it closed again (closed by the other process's probe).
"""

from __future__ import annotations

import argparse
import time

import grpc

from pkg.clients import BreakerOpenError, BreakerPolicy, Policy, RetryPolicy, Runtime, sync_channel
from pkg.clients.breaker import STATE_CLOSED, STATE_OPEN
from pkg.clients.shared_breaker import SharedBreakerStore
from pkg.proto.testsvc.v1 import testsvc_pb2 as pb
from pkg.proto.testsvc.v1 import testsvc_pb2_grpc as pb_grpc

POLICY = Policy(
    retry=RetryPolicy(max_attempts=1),
    breaker=BreakerPolicy(min_calls=5, failure_ratio=0.5, open_duration=1.5),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis")
    parser.add_argument("--target")
    parser.add_argument("--key")
    parser.add_argument("--namespace")
    args = parser.parse_args()
    store = SharedBreakerStore(args.redis, namespace=args.namespace, sync_interval=0.05)
    runtime = Runtime(shared_breakers=store)
    channel = sync_channel(args.target, POLICY, runtime=runtime)
    stub = pb_grpc.TestServiceStub(channel)
    request = pb.UnaryRequest(key=args.key, behavior=pb.Behavior(fail_times=-1, fail_code=14))
    for _ in range(500):
        try:
            stub.Unary(request, timeout=5)
        except BreakerOpenError:
            break
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    breaker = runtime.breakers[args.target]
    print(f"peer: opened state={breaker.state}", flush=True)
    seen_open, last = False, ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = breaker.state
        seen_open = seen_open or state == STATE_OPEN
        if state != last:
            print(f"peer: state={state}", flush=True)
            last = state
        if seen_open and state == STATE_CLOSED:
            print("peer: closed", flush=True)
            break
        time.sleep(0.02)
    channel.close()
    store.close()


if __name__ == "__main__":
    main()
