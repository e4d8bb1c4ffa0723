"""Benchmarks behind ``replay-bridge bench``: each returns a JSON-ready dict."""
