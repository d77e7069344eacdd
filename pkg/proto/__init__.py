"""Generated protobuf and gRPC stubs (./dev proto); sources in proto/."""
