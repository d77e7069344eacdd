"""A scriptable gRPC test service used to exercise pkg.clients against a real server."""
