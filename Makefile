# The two set-up commands (see README): `make start` and `make test`.
# Both create or reuse .venv/ via scripts/bootstrap (torch first, from the local CPU build);
# `make test` adds the dev extra and the system packages the tests need (scripts/bootstrap --dev).

PYTEST_ARGS ?=

.PHONY: start test bootstrap bootstrap-dev bench clean

bootstrap:
	@./scripts/bootstrap

bootstrap-dev:
	@./scripts/bootstrap --dev

## Prepare what is missing (base models, registry, demo experts, router, calibrator), then serve: `mose up`.
start: bootstrap
	@.venv/bin/mose up

## Run the whole test suite (unit + integration) on real models and a real registry.
test: bootstrap-dev
	@.venv/bin/python -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf .mose .mose-cache .pytest_cache
