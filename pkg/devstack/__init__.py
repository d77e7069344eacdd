"""Real servers on 127.0.0.1 for the dev stack and the tests: install, start, stop, pause."""
