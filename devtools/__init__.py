"""The implementation of ./dev: bootstrapped by the shell script, dispatched here."""
