# Two entry points: `make demo` and `make test`. Both set up .venv first (scripts/setup.sh).
.PHONY: setup vllm-env sglang-router-env demo test test-fast test-storage bench clean

setup:
	bash scripts/setup.sh

vllm-env:
	bash scripts/vllm_env.sh

sglang-router-env:
	bash scripts/sglang_router_env.sh

demo: setup
	.venv/bin/replay-bridge demo

# The whole suite, the real-vLLM integration test included.
test: setup vllm-env sglang-router-env
	.venv/bin/pytest -q

# Everything but the real-vLLM test (it needs the 3.4 GB .venv-vllm).
test-fast: setup
	.venv/bin/pytest -q -m "not vllm"

# The storage suite, on a local directory and on moto's S3 server on loopback (the tests start it).
test-storage: setup
	.venv/bin/pytest -q tests/test_s3_service.py tests/replay_bridge/shards tests/replay_bridge/cli

bench: setup
	.venv/bin/replay-bridge bench ingest
	.venv/bin/replay-bridge bench shards

clean:
	rm -rf out .pytest_cache .hypothesis
